"""Writing a benchmark's results: one JSON file and its PNGs in an output folder, and a printed table."""
from __future__ import annotations

import json
from pathlib import Path

from pdserve.bench.serving import plots
from pdserve.bench.serving.sweep import Point, sweep_goodput, sweep_json

TABLE_FIELDS = ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "p99_itl_ms", "slo_attainment")


def write_report(out_dir: str | Path, sweeps: dict[str, list[Point]], meta: dict, name: str = "results") -> dict:
    """`{name}.json` and the PNGs next to it; returns the JSON written (with `plots`: the PNG paths)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_slo = any("slo_attainment" in p.summary for points in sweeps.values() for p in points)
    pngs = [plots.latency_cdfs(sweeps, out / f"{name}_latency_cdf.png")]
    if has_slo:
        pngs.append(plots.attainment_vs_rate(sweeps, out / f"{name}_slo_attainment.png"))
        pngs.append(plots.goodput_bars({k: sweep_goodput(v) for k, v in sweeps.items()},
                                       out / f"{name}_goodput.png"))
    doc = {**meta, "deployments": [sweep_json(k, v) for k, v in sweeps.items()], "plots": [str(p) for p in pngs]}
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2))
    return doc


def format_table(label: str, points: list[Point]) -> str:
    """One line per load level: the headline figures."""
    lines = [f"== {label} (goodput: {_fmt(sweep_goodput(points))} req/s)",
             "load".ljust(14) + "".join(f.ljust(20) for f in ("completed", "failed", *TABLE_FIELDS))]
    for p in points:
        s = p.summary
        load = f"{p.spec.rate:g}/s" if p.spec.rate is not None else f"conc {p.spec.max_concurrency}"
        lines.append(load.ljust(14) + "".join(_fmt(s.get(f)).ljust(20) for f in ("completed", "failed",
                                                                               *TABLE_FIELDS)))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
