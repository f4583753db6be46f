"""Writing a benchmark's results: one JSON file and its PNGs in an output folder, and a printed table."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pdserve.bench.serving.sweep import Point, sweep_goodput, sweep_json

log = logging.getLogger(__name__)

RATIO_FIELDS = ("output_throughput", "request_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "p99_itl_ms", "slo_attainment")

TABLE_FIELDS = ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                "p99_tpot_ms", "p99_itl_ms", "slo_attainment")


def write_report(out_dir: str | Path, sweeps: dict[str, list[Point]], meta: dict, name: str = "results",
                 ratios: dict | None = None) -> dict:
    """`{name}.json` (with `ratios`, B ÷ A, for two deployments) and the PNGs next to it; returns the document
    written (`plots`: the PNG paths)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "deployments": [sweep_json(k, v) for k, v in sweeps.items()]}
    if ratios is not None:
        doc["ratios"] = ratios
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2))  # first: the figures are kept whatever happens to the plots
    doc["plots"] = draw_plots(doc, out, name)
    path.write_text(json.dumps(doc, indent=2))
    return doc


def draw_plots(doc: dict, out: Path, name: str) -> list[str]:
    """The PNGs of a report document (none, with a warning, where matplotlib is not installed)."""
    try:
        from pdserve.bench.serving import plots
    except ImportError as e:
        log.warning("bench: no plots (%s); `pdserve bench plot %s` draws them where matplotlib is installed",
                    e, out / f"{name}.json")
        return []
    deployments = doc["deployments"]
    pngs = [plots.latency_cdfs(deployments, out / f"{name}_latency_cdf.png")]
    if any("slo_attainment" in run for dep in deployments for run in dep["runs"]):
        pngs.append(plots.attainment_vs_rate(deployments, out / f"{name}_slo_attainment.png"))
        pngs.append(plots.goodput_bars({d["label"]: d["goodput"] for d in deployments}, out / f"{name}_goodput.png"))
    if "ratios" in doc:
        title = " ÷ ".join(reversed([d["label"] for d in deployments]))
        pngs.append(plots.ratio_bars(headline(doc["ratios"]), title, out / f"{name}_ratios.png"))
    return [str(p) for p in pngs]


def headline(ratios: dict) -> dict[str, float]:
    """Goodput and the highest load level's ratios, for the plot."""
    last = ratios["by_load"][-1] if ratios["by_load"] else {}
    return {"goodput": ratios["goodput"], **{k: v for k, v in last.items() if k in RATIO_FIELDS}}


def replot(path: str | Path) -> list[str]:
    """Draw a report's PNGs again from its JSON (next to it); the document's `plots` is updated."""
    path = Path(path)
    doc = json.loads(path.read_text())
    doc["plots"] = draw_plots(doc, path.parent, path.stem)
    path.write_text(json.dumps(doc, indent=2))
    return doc["plots"]


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
