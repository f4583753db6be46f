"""`pdserve bench`: load generation against a serving endpoint, workloads, metrics, plots.

Map: `workloads` builds the request set (seeded), `loadgen` sends it (arrivals, concurrency, warm-up),
`backends` speaks to a server (OpenAI HTTP streaming, our gRPC API), `metrics` turns per-request results
into vLLM-style figures and goodput, `plots` draws them, `sweep` runs a rate sweep against one endpoint,
`compare` runs it against two deployments, `overhead` measures the serving stack against the engine loop,
and `cli` is `pdserve bench`.
"""
