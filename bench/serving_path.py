"""The whole serving path on one GPU against the engine alone, measured in one run:

1. Decode: `--streams` concurrent streams of `--input-len` / `--output-len` through a colocated deployment.
   The worker's own step timings at batch `--streams` (decode steps only) against `LLMEngine.step`'s loop at
   the same batch and the same mean context, timed in this run before any deployment starts.
2. TTFT at `--long-len`-token prompts, one request at a time, through the colocated deployment and through
   a disaggregated one (`--disagg-config`, default configs/1gpu-1p1d.yaml: 1P1D sharing the GPU, KV over
   IPC), against the engine's own time for the same prompt (add it, step until its first token is read).
   What disaggregation adds to TTFT is TTFT minus that prefill time, as a share of TTFT.

    python -m pdserve.bench.serving_path [--model configs/models/llama3-8b] [--tokenizer DIR] [--out DIR]

Weights are random (`load_format: dummy`). The engine baseline runs in a child process, so its memory is
free again before the deployments start. Results: `serving_path.json` under `--out`, and a table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
import traceback
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.serving_path", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(CONFIGS / "models" / "llama3-8b"), help="a model folder (config.json)")
    p.add_argument("--tokenizer", default=None, help="the deployments' tokenizer folder (default: the config's)")
    p.add_argument("--disagg-config", default=str(CONFIGS / "1gpu-1p1d.yaml"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--long-len", type=int, default=4096)
    p.add_argument("--long-requests", type=int, default=8, help="timed TTFT requests per deployment")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="colocated and the engine")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides for every deployment and the engine (e.g. num_kv_blocks=512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    return p.parse_args(argv)


def colocated_config(args: argparse.Namespace):
    from pdserve.bench.serving.target import parse_overrides
    from pdserve.config import load_config

    streams = args.streams
    return load_config(None, model=args.model, tokenizer=args.tokenizer, load_format="dummy", seed=args.seed,
                       device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
                       disaggregated=False, max_num_seqs=max(streams, 64),
                       max_num_batched_tokens=max(8192, args.long_len),
                       max_model_len=max(args.long_len, args.input_len + args.output_len) + 64,
                       gpu_memory_utilization=args.gpu_memory_utilization,
                       limits={"max_concurrent_requests": 4 * streams, "max_queued_requests": 16 * streams},
                       router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0}, **parse_overrides(args.set))


def disagg_config(args: argparse.Namespace):
    from pdserve.bench.serving.target import parse_overrides
    from pdserve.config import load_config

    overrides = {"model": args.model, "load_format": "dummy", "seed": args.seed, "device": args.device,
                 "router": {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0}, **parse_overrides(args.set)}
    if args.tokenizer is not None:
        overrides["tokenizer"] = args.tokenizer
    return load_config(args.disagg_config, **overrides)


# --- the engine alone (a child process) ------------------------------------------------------------------
def engine_baseline(config, streams: int, context: int, long_prompt: list[int], repeats: int) -> dict:
    """Seconds per decode step of the engine's loop at `streams` x `context`, and the engine's time from
    adding `long_prompt` to reading its first token (median of `repeats`, after one unmeasured)."""
    from pdserve.bench.engine import loop_step, sync
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(config)
    decode_s = loop_step(engine, streams, context)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        rid = engine.add_request(list(long_prompt), params)
        done = False
        while not done:
            done = any(o.request_id == rid and o.finished for o in engine.step())
        sync()
        times.append(time.perf_counter() - start)
    return {"decode_step_s": decode_s, "decode_context": context, "prefill_s": statistics.median(times[1:])}


def _engine_child(queue, *args) -> None:
    try:
        queue.put(engine_baseline(*args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails with it
        queue.put({"error": traceback.format_exc()})


def run_engine_baseline(config, streams: int, context: int, long_prompt: list[int], repeats: int,
                        timeout_s: float = 900.0) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_engine_child, args=(queue, config, streams, context, long_prompt, repeats))
    child.start()
    try:
        out = queue.get(timeout=timeout_s)
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()
    if "error" in out:
        raise SystemExit(f"engine baseline failed: {out['error']}")
    return out


# --- the deployments ----------------------------------------------------------------------------------
def _load(address: str, requests, concurrency: int):
    from pdserve.bench.serving.backends import GrpcBackend
    from pdserve.bench.serving.loadgen import LoadSpec, run_load

    async def go():
        backend = GrpcBackend(address)
        try:
            return await run_load(backend, requests, LoadSpec(max_concurrency=concurrency, progress=False))
        finally:
            await backend.close()

    run = asyncio.run(go())
    failed = [r.error for r in run.results if not r.ok]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(run.results)} requests failed: {sorted(set(failed))}")
    return run


def _steps(server, role: str, clear: bool = True) -> list:
    import ray

    [worker] = [w for w in server.router.workers if w.role == role]
    return ray.get(worker.actor.step_timings.remote(clear), timeout=60)


def _transfer_seconds(server) -> float | None:
    registry = server.metrics.registry
    count = registry.get_sample_value("pdserve_kv_transfer_seconds_count") or 0
    return registry.get_sample_value("pdserve_kv_transfer_seconds_sum") / count if count else None


def _stage_sums(server) -> dict[str, tuple[float, float]]:
    """The router's per-stage (seconds, requests) totals so far."""
    out = {}
    for family in server.metrics.registry.collect():
        if family.name == "pdserve_request_stage_seconds":
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    total = out.setdefault(sample.labels["stage"], [0.0, 0.0])
                    total[sample.name.endswith("_count")] += sample.value
    return out


def _ttft(server, long_requests, prefill_role: str) -> dict:
    """TTFT one request at a time (the first one unmeasured), the prefill steps' own times, and the mean time
    the requests spent in each stage the router sees."""
    _load(server.grpc_address, long_requests[:1], 1)
    _steps(server, prefill_role)
    before = _stage_sums(server)
    run = _load(server.grpc_address, long_requests[1:], 1)
    after = _stage_sums(server)
    steps = [s.seconds for s in _steps(server, prefill_role) if not s.decode]
    stages = {k: (v[0] - before.get(k, (0.0, 0.0))[0]) / (v[1] - before.get(k, (0.0, 0.0))[1])
              for k, v in after.items() if v[1] > before.get(k, (0.0, 0.0))[1]}
    return {"ttft_s": statistics.median(r.ttft_s for r in run.results),
            "ttft_all_s": [r.ttft_s for r in run.results],
            "prefill_step_s": statistics.median(steps) if steps else None, "prefill_steps": len(steps),
            "stage_mean_s": stages}


def served_decode(server, requests, streams: int) -> dict:
    """Decode step times at batch `streams` while `streams` streams run through `server`."""
    _steps(server, "colocated")
    run = _load(server.grpc_address, requests, streams)
    steps = _steps(server, "colocated")
    full = [s.seconds for s in steps if s.decode and s.num_seqs == streams]
    tpots = [r.tpot_s for r in run.results if r.tpot_s is not None]
    return {"decode_step_s": statistics.median(full) if full else None, "decode_steps": len(full),
            "largest_batch": max((s.num_seqs for s in steps if s.decode), default=0),
            "tpot_s": statistics.median(tpots), "output_tokens_per_s": sum(r.output_len for r in run.results)
            / run.duration_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    from pdserve.bench.serving.workloads import random_requests
    from pdserve.cluster.serve import ServerThread
    from pdserve.engine.model_config import load_model_spec
    from pdserve.engine.model_source import resolve_model

    vocab = load_model_spec(resolve_model(args.model)).vocab_size
    requests = random_requests(args.streams, args.input_len, args.output_len, vocab, args.seed)
    long_requests = random_requests(args.long_requests + 1, args.long_len, 4, vocab, args.seed + 1)
    config = colocated_config(args)
    context = args.input_len + args.output_len // 2  # the served streams' mean context while they decode
    t0 = time.perf_counter()
    engine = run_engine_baseline(config, args.streams, context, long_requests[1].prompt_ids, 5)
    print(f"engine: decode step {engine['decode_step_s'] * 1e3:.2f} ms at B={args.streams} ctx={context}; "
          f"{args.long_len}-token prompt to first token {engine['prefill_s'] * 1e3:.1f} ms", flush=True)
    with ServerThread(config) as server:
        colocated = served_decode(server, requests, args.streams)
        colocated.update(_ttft(server, long_requests, "colocated"))
    print(f"colocated: {json.dumps(colocated)[:300]}", flush=True)
    with ServerThread(disagg_config(args)) as server:
        disagg = _ttft(server, long_requests, "prefill")
        disagg["transfer_s"] = _transfer_seconds(server)
    result = {"device": _device_name(args.device), "model": args.model, "streams": args.streams,
              "input_len": args.input_len, "output_len": args.output_len, "long_len": args.long_len,
              "engine": engine, "colocated": colocated, "disaggregated": disagg,
              "disagg_config": args.disagg_config, "wall_s": time.perf_counter() - t0}
    result["figures"] = figures(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_path.json").write_text(json.dumps(result, indent=2))
    print(format_figures(result["figures"]))
    return 0


def figures(r: dict) -> dict:
    """The headline ratios (None where a figure is missing)."""
    e, c, d = r["engine"], r["colocated"], r["disaggregated"]

    def div(a, b):
        return None if a is None or b is None or b == 0 else a / b

    return {
        "served_decode_step_ms": _ms(c["decode_step_s"]), "engine_decode_step_ms": _ms(e["decode_step_s"]),
        "decode_step_served_over_engine": div(c["decode_step_s"], e["decode_step_s"]),
        "engine_prefill_ms": _ms(e["prefill_s"]), "colocated_ttft_ms": _ms(c["ttft_s"]),
        "disagg_ttft_ms": _ms(d["ttft_s"]), "disagg_prefill_step_ms": _ms(d["prefill_step_s"]),
        "transfer_ms": _ms(d["transfer_s"]),
        "disagg_ttft_added_share": div(d["ttft_s"] - e["prefill_s"], d["ttft_s"]),
        "colocated_ttft_added_share": div(c["ttft_s"] - e["prefill_s"], c["ttft_s"]),
        "disagg_over_colocated_ttft": div(d["ttft_s"], c["ttft_s"]),
    }


def format_figures(f: dict) -> str:
    rows = [(k, "-" if v is None else f"{v:.4g}") for k, v in f.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
