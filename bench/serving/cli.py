"""`pdserve bench serve|compare|overhead`: the sub-commands, their arguments and handlers.

`add_bench_parser(sub)` is all `pdserve.cli` calls (through the `pdserve.commands` entry point in pyproject.toml);
everything heavy is imported when a command runs.
"""
from __future__ import annotations

import argparse
import math

WORKLOADS = ("random", "sharegpt", "long-prompt", "shared-prefix", "trace")


def add_bench_parser(sub) -> None:
    """Add `bench` and its sub-commands to the `pdserve` sub-parsers `sub`."""
    b = sub.add_parser("bench", help="load-test a server: latency, throughput, goodput under SLOs, plots")
    bsub = b.add_subparsers(dest="bench_command", required=True)

    s = bsub.add_parser("serve", aliases=["run"], help="a workload and rate sweep against one endpoint")
    s.add_argument("--url", default=None, help="a running server: http://host:port (openai) or host:port (grpc); "
                                               "default: start --config in this process")
    s.add_argument("-c", "--config", default=None, help="deployment YAML to start (default: the embedded default)")
    _add_common(s)
    s.set_defaults(func=_run_serve)

    c = bsub.add_parser("compare", help="the same workload and sweep against two deployments, one after the other")
    c.add_argument("targets", nargs=2, metavar="TARGET", help="a deployment YAML or a running server's URL")
    _add_common(c)
    c.set_defaults(func=_run_compare)

    pl = bsub.add_parser("plot", help="draw a report's PNGs again from its JSON (e.g. one written without matplotlib)")
    pl.add_argument("report", help="a results.json / compare.json that `pdserve bench` wrote")
    pl.set_defaults(func=_run_plot)

    o = bsub.add_parser("overhead", help="the serving stack's cost: HTTP and gRPC streams vs the engine loop")
    from pdserve.bench.serving.overhead import add_overhead_args, run_overhead_cli

    add_overhead_args(o)
    o.set_defaults(func=run_overhead_cli)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["openai", "grpc"], default="openai")
    p.add_argument("--model", default=None, help="openai: the `model` field to send; deployments: model override")
    p.add_argument("--api-key", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="deployment field overrides")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=int, default=128)
    w.add_argument("--output-len", type=int, default=64)
    w.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths uniform within ±this fraction")
    w.add_argument("--num-groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    w.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: tokens per prefix")
    w.add_argument("--trace", default=None, help="trace: a Mooncake-format JSONL file")
    w.add_argument("--trace-time-scale", type=float, default=1.0, help="trace: stretch (>1) or squeeze arrivals")
    w.add_argument("--vocab-size", type=int, default=None, help="prompt ids are drawn below this (default: ask)")
    w.add_argument("--tokenizer", default=None,
                   help="send prompts as text (words of this tokenizer folder's vocabulary, exactly as many "
                        "tokens), for servers that take only text; default: token ids")
    w.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly --output-len tokens (--no-ignore-eos: for servers that refuse the field)")
    w.add_argument("--seed", type=int, default=0, help="same seed, same requests and arrival times")
    ld = p.add_argument_group("load")
    ld.add_argument("--request-rate", default=None,
                    help="req/s, a comma-separated sweep (e.g. 1,2,4,inf); default inf, or closed loop "
                         "when only --max-concurrency is given")
    ld.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    ld.add_argument("--max-concurrency", type=int, default=None)
    ld.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the figures")
    ld.add_argument("--duration", type=float, default=None, help="bound on each load level's seconds")
    ld.add_argument("--slo-ttft-ms", type=float, default=None)
    ld.add_argument("--slo-tpot-ms", type=float, default=None)
    out = p.add_argument_group("output")
    out.add_argument("--out", default="bench-results", help="folder for the JSON and PNGs")
    out.add_argument("--no-progress", action="store_true")


def parse_rates(text: str | None, max_concurrency: int | None) -> list[float | None]:
    """`--request-rate` as a list (None: closed loop)."""
    if text is None:
        return [None] if max_concurrency is not None else [math.inf]
    return [float(x) for x in text.split(",") if x.strip()]


def build_workload(args: argparse.Namespace, vocab: int):
    """The request set the arguments describe (warm-up requests first)."""
    from pdserve.bench.serving import workloads as w

    requests = _token_requests(args, vocab)
    if args.tokenizer is None:
        return requests
    from transformers import AutoTokenizer

    return w.as_text(requests, AutoTokenizer.from_pretrained(args.tokenizer).backend_tokenizer)


def _token_requests(args: argparse.Namespace, vocab: int):
    from pdserve.bench.serving import workloads as w

    n, seed = args.num_prompts + args.warmup, args.seed
    if args.workload == "random":
        return w.random_requests(n, args.input_len, args.output_len, vocab, seed, args.range_ratio)
    if args.workload == "sharegpt":
        return w.sharegpt_requests(n, vocab, seed)
    if args.workload == "long-prompt":
        return w.long_prompt_requests(n, vocab, seed, output_len=args.output_len)
    if args.workload == "shared-prefix":
        return w.shared_prefix_requests(n, args.num_groups, args.prefix_len, args.input_len, args.output_len,
                                        vocab, seed)
    if args.trace is None:
        raise SystemExit("error: --workload trace needs --trace FILE")
    records = w.load_mooncake_trace(args.trace)[:n]
    return w.trace_requests(records, vocab, seed, time_scale=args.trace_time_scale)


def load_spec(args: argparse.Namespace):
    from pdserve.bench.serving.loadgen import LoadSpec

    return LoadSpec(burstiness=args.burstiness, max_concurrency=args.max_concurrency, warmup=args.warmup,
                    duration_s=args.duration, seed=args.seed, progress=not args.no_progress)


def slo_of(args: argparse.Namespace):
    from pdserve.bench.serving.metrics import SLO

    if (args.slo_ttft_ms is None) != (args.slo_tpot_ms is None):
        raise SystemExit("error: give both --slo-ttft-ms and --slo-tpot-ms, or neither")
    return None if args.slo_ttft_ms is None else SLO(args.slo_ttft_ms, args.slo_tpot_ms)


def overrides_of(args: argparse.Namespace) -> dict:
    from pdserve.bench.serving.target import parse_overrides

    return {**parse_overrides(args.set), **({"model": args.model} if args.model else {})}


def _run_serve(args: argparse.Namespace) -> int:
    from pdserve.bench.serving.compare import bench_targets

    return bench_targets([args.url] if args.url else [args.config], args, name="results",
                         allow_default=args.url is None)


def _run_plot(args: argparse.Namespace) -> int:
    from pdserve.bench.serving.report import replot

    for png in replot(args.report):
        print(png)
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from pdserve.bench.serving.compare import bench_targets

    return bench_targets(args.targets, args, name="compare")
