"""A rate sweep against one endpoint: the same request set at each rate, figures per rate, goodput."""
from __future__ import annotations

import dataclasses
import math

from pdserve.bench.serving.backends import Backend
from pdserve.bench.serving.loadgen import LoadSpec, RunResult, run_load
from pdserve.bench.serving.metrics import SLO, goodput, summarize
from pdserve.bench.serving.workloads import BenchRequest


@dataclasses.dataclass
class Point:
    """One load level of a sweep: what was asked, the figures, and the raw results (for plots)."""

    spec: LoadSpec
    summary: dict
    run: RunResult

    def to_json(self, detailed: bool = True) -> dict:
        out = {"request_rate": _rate(self.spec.rate), "burstiness": self.spec.burstiness,
               "max_concurrency": self.spec.max_concurrency, **self.summary}
        if detailed:  # per request, in seconds, as `vllm bench serve --save-detailed` writes them
            ok = [r for r in self.run.results if r.ok]
            out.update(ttfts=[r.ttft_s for r in ok], e2els=[r.e2e_s for r in ok],
                       output_lens=[r.output_len for r in ok], tpots=[r.tpot_s for r in ok])
        return out


def _rate(rate: float | None) -> float | str | None:
    return "inf" if rate is not None and math.isinf(rate) else rate


async def run_sweep(backend: Backend, requests: list[BenchRequest], base: LoadSpec,
                    rates: list[float | None], slo: SLO | None = None) -> list[Point]:
    """Run `requests` once per rate (None: closed loop at `base.max_concurrency`), lowest first."""
    points = []
    for rate in sorted(rates, key=lambda r: math.inf if r is None else r):
        spec = dataclasses.replace(base, rate=rate)
        run = await run_load(backend, requests, spec)
        points.append(Point(spec, summarize(run.results, run.duration_s, slo), run))
    return points


def sweep_goodput(points: list[Point]) -> float | None:
    """Goodput over the finite-rate points that carry SLO attainment (all at once is no rate)."""
    return goodput([(p.spec.rate, p.summary["slo_attainment"]) for p in points
                    if p.spec.rate is not None and math.isfinite(p.spec.rate) and "slo_attainment" in p.summary])


def sweep_json(label: str, points: list[Point], detailed: bool = True) -> dict:
    return {"label": label, "goodput": sweep_goodput(points), "runs": [p.to_json(detailed) for p in points]}
