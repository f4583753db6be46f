"""Figures of one run, named as `vllm bench serve` names them, SLO attainment, and goodput over a sweep.

Per request: TTFT (send to first token), TPOT ((E2E - TTFT) / (output tokens - 1)), ITL (each gap
between streamed chunks after the first), E2E (send to last token; `e2el` in field names). Each gets
mean / median (= p50) / std / p90 / p99 in ms, over successful requests (ITL over all their gaps).
Percentiles interpolate linearly between order statistics (numpy's default, as vLLM does).

A request meets the SLO when it succeeded, its TTFT ≤ `ttft_ms` and its TPOT ≤ `tpot_ms` (a one-token
output has no TPOT and meets that half). Attainment is the fraction of all measured requests — failed
ones count as misses — that meet it. Goodput (DistServe) is the highest swept rate whose attainment is at
least `target` (0.9), counting only rates below the first one that misses it (a noisy pass above a
failure is not goodput).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pdserve.bench.serving.backends import RequestResult

PERCENTILES = (50, 90, 99)
GOODPUT_TARGET = 0.9


@dataclass(frozen=True)
class SLO:
    """Latency objectives in milliseconds."""

    ttft_ms: float
    tpot_ms: float

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        tpot = r.tpot_s
        return r.ttft_s * 1e3 <= self.ttft_ms and (tpot is None or tpot * 1e3 <= self.tpot_ms)


def distribution(name: str, values_s: list[float]) -> dict[str, float]:
    """`mean_/median_/std_/p50_/p90_/p99_{name}_ms` of `values_s` (seconds); NaN-free zeros when empty."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    out.update({f"p{p}_{name}_ms": float(np.percentile(ms, p)) for p in PERCENTILES})
    return out


def attainment(results: list[RequestResult], slo: SLO) -> float:
    """The fraction of `results` that meet `slo` (0 when there are none)."""
    return sum(slo.met(r) for r in results) / len(results) if results else 0.0


def summarize(results: list[RequestResult], duration_s: float, slo: SLO | None = None) -> dict:
    """The run's JSON figures."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    out = {
        "duration": duration_s, "completed": len(ok), "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
    }
    out.update(distribution("ttft", [r.ttft_s for r in ok]))
    out.update(distribution("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]))
    out.update(distribution("itl", [g for r in ok for g in r.itl_s]))
    out.update(distribution("e2el", [r.e2e_s for r in ok]))
    if slo is not None:
        met = sum(slo.met(r) for r in results)
        out.update({"slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms,
                    "slo_attainment": met / len(results) if results else 0.0,
                    "request_goodput": met / duration_s})
    return out


def goodput(points: list[tuple[float, float]], target: float = GOODPUT_TARGET) -> float | None:
    """The goodput of a sweep of (rate, attainment) points; None when even the lowest rate misses."""
    best = None
    for rate, att in sorted(points):
        if att < target:
            break
        best = rate
    return best
