"""One benchmark over one or two targets (deployment YAMLs started in turn in this process, or running
servers' URLs): the same request set and sweep against each, figures side by side, B ÷ A ratios."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
from pathlib import Path

from pdserve.bench.serving import plots
from pdserve.bench.serving.backends import make_backend
from pdserve.bench.serving.cli import build_workload, load_spec, overrides_of, parse_rates, slo_of
from pdserve.bench.serving.report import format_table, write_report
from pdserve.bench.serving.sweep import Point, run_sweep, sweep_goodput
from pdserve.bench.serving.target import deployed, is_url, url_target, vocab_size

RATIO_FIELDS = ("output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "p99_itl_ms", "slo_attainment")


def bench_targets(specs: list[str | None], args: argparse.Namespace, name: str, allow_default: bool = False) -> int:
    """Run the arguments' workload and sweep against each target in turn; write `{name}.json` and PNGs
    under `args.out`, print the tables (and the ratios, for two)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    rates, spec, slo = parse_rates(args.request_rate, args.max_concurrency), load_spec(args), slo_of(args)
    sweeps: dict[str, list[Point]] = {}
    requests = None
    for target_spec, label in zip(specs, labels(specs)):
        with _open(target_spec, overrides_of(args), label, allow_default) as target:
            if requests is None:  # one request set for every target (the first one's vocabulary)
                requests = build_workload(args, vocab_size(target, args.vocab_size))
            model = args.model if target_spec is not None and is_url(target_spec) else None
            try:
                backend_url = target.url_for(args.backend)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            sweeps[label] = asyncio.run(_sweep(args, backend_url, model, requests, spec, rates, slo))
        print(format_table(label, sweeps[label]), flush=True)
    meta = {"workload": args.workload, "num_prompts": args.num_prompts, "seed": args.seed, "backend": args.backend,
            "request_rates": [str(r) for r in rates]}
    doc = write_report(args.out, sweeps, meta, name)
    if len(sweeps) == 2:
        table = ratios(*sweeps.values())
        print(format_ratios(list(sweeps), table))
        title = " ÷ ".join(reversed(list(sweeps)))
        png = plots.ratio_bars(_headline(table), title, Path(args.out) / f"{name}_ratios.png")
        doc.update(ratios=table, plots=[*doc["plots"], str(png)])
        (Path(args.out) / f"{name}.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {Path(args.out) / (name + '.json')} and {len(doc['plots'])} plots", flush=True)
    return 0


def labels(specs: list[str | None]) -> list[str]:
    """Short names: a YAML's stem, a URL as given; prefixed A:/B: when they would clash."""
    names = [spec if spec is not None and is_url(spec) else Path(spec or "default").stem for spec in specs]
    return names if len(set(names)) == len(names) else [f"{k}:{n}" for k, n in zip("AB", names)]


@contextlib.contextmanager
def _open(spec: str | None, overrides: dict, label: str, allow_default: bool):
    if spec is not None and is_url(spec):
        yield dataclasses.replace(url_target(spec), label=label)
        return
    if spec is None and not allow_default:
        raise SystemExit("error: a target is missing")
    with deployed(spec, overrides, label) as target:
        yield target


async def _sweep(args, url, model, requests, spec, rates, slo) -> list[Point]:
    backend = make_backend(args.backend, url, model=model, api_key=args.api_key)
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


def _headline(table: dict) -> dict[str, float]:
    """Goodput and the highest load level's ratios, for the plot."""
    last = table["by_load"][-1] if table["by_load"] else {}
    out = {"goodput": table["goodput"]}
    out.update({k: v for k, v in last.items() if k in RATIO_FIELDS})
    return out


def format_ratios(names: list[str], table: dict) -> str:
    lines = [f"== {names[1]} ÷ {names[0]}: goodput {_f(table['goodput'])}"]
    for row in table["by_load"]:
        load = f"{row['request_rate']}/s" if row["request_rate"] is not None else f"conc {row['max_concurrency']}"
        lines.append(f"{load:>12}  " + "  ".join(f"{k} {_f(row.get(k))}" for k in RATIO_FIELDS if k in row))
    return "\n".join(lines)


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"
