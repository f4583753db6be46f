"""One benchmark over one or two targets (deployment YAMLs started in turn in this process, or running
servers' URLs): the same request set and sweep against each, figures side by side, B ÷ A ratios."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path

from pdserve.bench.serving.backends import make_backend
from pdserve.bench.serving.cli import build_workload, load_spec, overrides_of, parse_rates, slo_of
from pdserve.bench.serving.report import RATIO_FIELDS, format_table, write_report
from pdserve.bench.serving.sweep import Point, run_sweep, sweep_goodput
from pdserve.bench.serving.target import Target, deployed, is_url, url_target, vocab_size


def bench_targets(specs: list[str | None], args: argparse.Namespace, name: str, allow_default: bool = False) -> int:
    """Run the arguments' workload and sweep against each target in turn; write `{name}.json` and PNGs
    under `args.out`, print the tables (and the ratios, for two)."""
    overrides = overrides_of(args)
    openers = [functools.partial(_open, spec, overrides, label, allow_default, args.model)
               for spec, label in zip(specs, labels(specs))]
    return run_targets(openers, args, name)


def run_targets(openers: list[Callable[[], contextlib.AbstractContextManager[Target]]], args: argparse.Namespace,
                name: str) -> int:
    """`bench_targets` over targets that `openers` bring up (and take down) one after the other."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    rates, spec, slo = parse_rates(args.request_rate, args.max_concurrency), load_spec(args), slo_of(args)
    sweeps: dict[str, list[Point]] = {}
    requests = None
    for opener in openers:
        with opener() as target:
            if requests is None:  # one request set for every target (the first one's vocabulary)
                requests = build_workload(args, vocab_size(target, args.vocab_size))
            try:
                backend_url = target.url_for(args.backend)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            backend = functools.partial(make_backend, args.backend, backend_url, model=target.model,
                                        api_key=args.api_key, ignore_eos=args.ignore_eos and target.ignore_eos)
            sweeps[target.label] = asyncio.run(_sweep(backend, requests, spec, rates, slo))
        print(format_table(target.label, sweeps[target.label]), flush=True)
    meta = {"workload": args.workload, "num_prompts": args.num_prompts, "seed": args.seed, "backend": args.backend,
            "request_rates": [str(r) for r in rates], "text_prompts": args.tokenizer is not None}
    table = ratios(*sweeps.values()) if len(sweeps) == 2 else None
    doc = write_report(args.out, sweeps, meta, name, table)
    if table is not None:
        print(format_ratios(list(sweeps), table))
    print(f"wrote {Path(args.out) / (name + '.json')} and {len(doc['plots'])} plots", flush=True)
    return 0


def labels(specs: list[str | None]) -> list[str]:
    """Short names: a YAML's stem, a URL as given; prefixed A:/B: when they would clash."""
    names = [spec if spec is not None and is_url(spec) else Path(spec or "default").stem for spec in specs]
    return names if len(set(names)) == len(names) else [f"{k}:{n}" for k, n in zip("AB", names)]


@contextlib.contextmanager
def _open(spec: str | None, overrides: dict, label: str, allow_default: bool, model: str | None = None):
    if spec is not None and is_url(spec):
        yield dataclasses.replace(url_target(spec), label=label, model=model)
        return
    if spec is None and not allow_default:
        raise SystemExit("error: a target is missing")
    with deployed(spec, overrides, label) as target:
        yield target


async def _sweep(make, requests, spec, rates, slo) -> list[Point]:
    backend = make()  # on this event loop (a gRPC channel belongs to the loop it was made on)
    try:
        return await run_sweep(backend, requests, spec, rates, slo)
    finally:
        await backend.close()


def ratios(a: list[Point], b: list[Point]) -> dict:
    """B ÷ A: goodput, and each field at each load level both swept."""
    out = {"goodput": _div(sweep_goodput(b), sweep_goodput(a)), "by_load": []}
    for pa, pb in zip(a, b):
        row = {"request_rate": pa.spec.rate if pa.spec.rate is None or math.isfinite(pa.spec.rate) else "inf",
               "max_concurrency": pa.spec.max_concurrency}
        row.update({f: _div(pb.summary.get(f), pa.summary.get(f)) for f in RATIO_FIELDS if f in pa.summary})
        out["by_load"].append(row)
    return out


def _div(x, y) -> float | None:
    return None if x is None or y is None or y == 0 else x / y


def format_ratios(names: list[str], table: dict) -> str:
    lines = [f"== {names[1]} ÷ {names[0]}: goodput {_f(table['goodput'])}"]
    for row in table["by_load"]:
        load = f"{row['request_rate']}/s" if row["request_rate"] is not None else f"conc {row['max_concurrency']}"
        lines.append(f"{load:>12}  " + "  ".join(f"{k} {_f(row.get(k))}" for k in RATIO_FIELDS if k in row))
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
