"""The serving stack's own cost: a tiny model with random weights (the model costs next to nothing), N
concurrent streams through HTTP and through gRPC to a `pdserve serve` process, against the in-process
engine loop (`LLMEngine.step`) running the same requests at the same batch size, in the same run.

Reported per stream count: output tokens/s delivered (served ÷ in-process), the mean TPOT each way and
the difference (the per-token latency the stack adds), and the CPU seconds the server's main process
(router, HTTP, gRPC) and this client spent per streamed token and per streamed chunk (the router's work is
per chunk; tokens per chunk grow as the router falls behind) — with a 2-core machine the processes share
cores, so the router's own ceiling is tokens ÷ its CPU seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVING_LINE = re.compile(r"gRPC (\S+) \| HTTP (\S+)")


def add_overhead_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default="64,256", help="comma-separated concurrent stream counts")
    p.add_argument("--apis", default="http,grpc", help="comma-separated: http, grpc")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--waves", type=int, default=2, help="requests per stream")
    p.add_argument("-c", "--config", default=None, help="deployment YAML (default: the tiny dummy model, colocated)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--no-progress", action="store_true")


def tiny_deployment(folder: str, max_streams: int, input_len: int, output_len: int):
    """The tiny dummy model colocated on CPU, with room for `max_streams` sequences."""
    from pdserve.bench.serving.tiny_model import write_tiny_model
    from pdserve.config import load_config

    blocks_per_seq = -(-(input_len + output_len) // 16) + 1
    return load_config(None, model=write_tiny_model(folder), load_format="dummy", device="cpu", dtype="float32",
                       disaggregated=False, max_num_seqs=max_streams,
                       max_num_batched_tokens=max(2048, max_streams * 2), num_kv_blocks=max_streams * blocks_per_seq,
                       limits={"max_concurrent_requests": max_streams, "max_queued_requests": 4 * max_streams},
                       router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0})


def engine_loop(config, requests, streams: int) -> dict:
    """The same requests through `LLMEngine.step` in this process, `streams` at a time, one torch thread
    (as a Ray worker gets): output tokens/s and mean TPOT."""
    import torch

    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(config.model_copy(update={"max_num_seqs": streams}))
    times: dict[str, list[float]] = {}
    start = time.perf_counter()
    for r in requests:
        rid = engine.add_request(r.prompt_ids, SamplingParams(max_tokens=r.output_len, temperature=0.0,
                                                             ignore_eos=True))
        times[rid] = []
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            times[o.request_id] += [now] * len(o.new_token_ids)
    duration = time.perf_counter() - start
    tokens = sum(len(t) for t in times.values())
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    return {"output_throughput": tokens / duration, "mean_tpot_ms": 1e3 * sum(tpots) / len(tpots),
            "total_output_tokens": tokens, "duration": duration}


@contextlib.contextmanager
def served(config, start_timeout_s: float, log_path: Path):
    """`pdserve serve` in a child process (the router gets a process of its own, as deployed); yields
    (http_url, grpc_address, pid)."""
    cfg = Path(tempfile.mkdtemp(prefix="pdserve-overhead-")) / "deployment.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "-c", str(cfg)], stdout=subprocess.PIPE,
                                stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        http, grpc_addr = _wait_serving(proc, start_timeout_s, log_path)
        yield http, grpc_addr, proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_serving(proc: subprocess.Popen, timeout_s: float, log_path: Path) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        m = SERVING_LINE.search(line)
        if m:
            return m.group(2), m.group(1)
        if time.monotonic() > deadline:
            break
    raise RuntimeError(f"pdserve serve did not come up (exit {proc.poll()}); its log: {log_path}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(api: str, url: str, requests, streams: int, pid: int, progress: bool) -> dict:
    """Closed loop at `streams` through `api`: the run's figures plus CPU seconds per token."""
    from pdserve.bench.serving.backends import make_backend
    from pdserve.bench.serving.loadgen import LoadSpec, run_load
    from pdserve.bench.serving.metrics import summarize

    backend = make_backend("openai" if api == "http" else "grpc", url)
    try:
        await run_load(backend, requests[:streams], LoadSpec(max_concurrency=streams, progress=False))  # warm
        server0, client0 = cpu_seconds(pid), time.process_time()
        run = await run_load(backend, requests, LoadSpec(max_concurrency=streams, progress=progress))
        server_cpu, client_cpu = cpu_seconds(pid) - server0, time.process_time() - client0
    finally:
        await backend.close()
    s = summarize(run.results, run.duration_s)
    tokens = max(s["total_output_tokens"], 1)
    # streamed messages that carried tokens (over HTTP: SSE chunks with text): the router's cost is per message
    chunks = max(sum(len(r.itl_s) + (r.ttft_s is not None) for r in run.results), 1)
    return {**{k: s[k] for k in ("completed", "failed", "errors", "duration", "total_output_tokens",
                                 "output_throughput", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
                                 "mean_ttft_ms")},
            "router_cpu_us_per_token": 1e6 * server_cpu / tokens, "client_cpu_us_per_token": 1e6 * client_cpu / tokens,
            "tokens_per_chunk": tokens / chunks, "router_cpu_us_per_chunk": 1e6 * server_cpu / chunks,
            "router_cpu_bound_tokens_per_s": tokens / server_cpu if server_cpu else None}


def run_overhead(args: argparse.Namespace) -> dict:
    """The whole scenario; returns (and writes) its JSON."""
    from pdserve.bench.serving.workloads import random_requests

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    streams = [int(s) for s in args.streams.split(",")]
    apis = [a.strip() for a in args.apis.split(",")]
    config = _config(args, max(streams))
    vocab = 256 if args.config is None else 1000
    doc = {"streams": streams, "input_len": args.input_len, "output_len": args.output_len, "results": []}
    with served(config, args.start_timeout, out / "overhead_server.log") as (http, grpc_addr, pid):
        for n in streams:
            reqs = random_requests(n * args.waves, args.input_len, args.output_len, vocab, args.seed)
            row = {"streams": n, "engine": engine_loop(config, reqs, n)}
            for api in apis:
                row[api] = asyncio.run(measure(api, http if api == "http" else grpc_addr, reqs, n, pid,
                                               not args.no_progress))
                row[api]["ratio_to_engine"] = row[api]["output_throughput"] / row["engine"]["output_throughput"]
                row[api]["added_tpot_ms"] = row[api]["mean_tpot_ms"] - row["engine"]["mean_tpot_ms"]
            doc["results"].append(row)
            print(format_row(row, apis), flush=True)
    doc["plots"] = [str(_plot(doc, apis, out))]
    (out / "overhead.json").write_text(json.dumps(doc, indent=2))
    return doc


def _config(args, max_streams: int):
    if args.config is None:
        folder = Path(tempfile.gettempdir()) / "pdserve-bench-tiny"
        return tiny_deployment(str(folder), max_streams, args.input_len, args.output_len)
    from pdserve.config import load_config

    return load_config(args.config, router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0})


def format_row(row: dict, apis: list[str]) -> str:
    e = row["engine"]
    parts = [f"{row['streams']} streams | engine {e['output_throughput']:.0f} tok/s, TPOT {e['mean_tpot_ms']:.2f} ms"]
    for api in apis:
        r = row[api]
        parts.append(f"{api} {r['output_throughput']:.0f} tok/s ({r['ratio_to_engine']:.2f}x), TPOT "
                     f"{r['mean_tpot_ms']:.2f} ms (+{r['added_tpot_ms']:.2f}), router "
                     f"{r['router_cpu_us_per_token']:.0f} us CPU/token ({r['router_cpu_us_per_chunk']:.0f} per chunk "
                     f"of {r['tokens_per_chunk']:.2f}), failed {r['failed']}")
    return " | ".join(parts)


def _plot(doc: dict, apis: list[str], out: Path) -> Path:
    from pdserve.bench.serving.plots import ratio_bars

    ratios = {f"{api} @{row['streams']}": row[api]["ratio_to_engine"] for row in doc["results"] for api in apis}
    return ratio_bars(ratios, "served tokens/s ÷ in-process engine", out / "overhead_ratios.png")


def run_overhead_cli(args: argparse.Namespace) -> int:
    run_overhead(args)
    print(f"wrote {Path(args.out) / 'overhead.json'}")
    return 0
