"""PNG figures of a benchmark report (its JSON document; matplotlib, Agg: no display needed): latency CDFs,
SLO attainment against request rate, goodput bars, and a comparison's ratios."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pdserve.bench.serving.metrics import GOODPUT_TARGET


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(run: dict) -> str:
    rate = run["request_rate"]
    return f"{rate:g} req/s" if isinstance(rate, (int, float)) else ("all at once" if rate == "inf"
                                                                      else f"conc {run['max_concurrency']}")


def latency_cdfs(deployments: list[dict], path: Path) -> Path:
    """TTFT, TPOT and E2E CDFs: one line per (deployment, load level). `deployments`: a report's."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (name, key) in zip(axes, (("TTFT", "ttfts"), ("TPOT", "tpots"), ("E2E", "e2els"))):
        for dep in deployments:
            for run in dep["runs"]:
                v = np.sort([x * 1e3 for x in run.get(key, ()) if x is not None])
                if v.size:
                    ax.plot(v, np.arange(1, v.size + 1) / v.size, label=f"{dep['label']} {_label(run)}")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of requests", title=f"{name} CDF")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def attainment_vs_rate(deployments: list[dict], path: Path) -> Path:
    """SLO attainment against the offered request rate, with the goodput target line."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for dep in deployments:
        pts = [(r["request_rate"], r["slo_attainment"]) for r in dep["runs"]
               if isinstance(r["request_rate"], (int, float)) and "slo_attainment" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=dep["label"])
    ax.axhline(GOODPUT_TARGET, color="gray", linestyle="--", label=f"{GOODPUT_TARGET:.0%} target")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02), title="SLO attainment")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def goodput_bars(goodputs: dict[str, float | None], path: Path) -> Path:
    """One bar per deployment (0 where no swept rate met the target)."""
    fig, ax = plt.subplots(figsize=(5, 4))
    names = list(goodputs)
    ax.bar(names, [goodputs[n] or 0.0 for n in names], color=["C0", "C1", "C2", "C3"][: len(names)])
    ax.set(ylabel="goodput (req/s)", title=f"goodput (≥{GOODPUT_TARGET:.0%} meet TTFT and TPOT SLOs)")
    return _save(fig, path)


def ratio_bars(ratios: dict[str, float], title: str, path: Path) -> Path:
    """Named ratios (B ÷ A, or served ÷ in-process) as bars around 1.0."""
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(ratios)), 4))
    ax.bar(list(ratios), [v if v is not None and math.isfinite(v) else 0.0 for v in ratios.values()])
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set(ylabel="ratio", title=title)
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)
