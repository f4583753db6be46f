"""The load generator: sends a workload to a backend at a request rate or a fixed concurrency.

Open loop (`rate`): requests are sent at gamma-distributed gaps whatever the server does (Poisson at
`burstiness` 1; below 1 burstier, above 1 steadier: the gaps' coefficient of variation is 1/√burstiness),
at most `max_concurrency` outstanding if set. Closed loop (`rate` None): `max_concurrency` requests
outstanding at all times. The first `warmup` requests are sent first and waited for; they are not in the
results. The run ends when every request has been sent and answered, or at `duration_s`: then what is
outstanding is cancelled and left out.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from pdserve.bench.serving.backends import Backend, RequestResult
from pdserve.bench.serving.workloads import BenchRequest


def arrival_gaps(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """`num` gaps (seconds) between sends: gamma(shape=burstiness, mean=1/rate); all 0 at rate inf."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return np.zeros(num)
    return np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=num)


@dataclass(frozen=True)
class LoadSpec:
    """How to send: `rate` requests/s (None: closed loop at `max_concurrency`), `burstiness`, the seed of
    the arrival times, requests sent first and excluded (`warmup`), and a bound on the run's time."""

    rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 0
    duration_s: float | None = None
    seed: int = 0
    progress: bool = True


@dataclass
class RunResult:
    """The measured requests' results, in send order, and the measured span's wall time."""

    results: list[RequestResult]
    duration_s: float
    num_unfinished: int = 0  # cut off by the time bound


async def run_load(backend: Backend, requests: list[BenchRequest], spec: LoadSpec) -> RunResult:
    """Send `requests` (the first `spec.warmup` of them as warm-up) as `spec` says."""
    if spec.rate is None and spec.max_concurrency is None:
        raise ValueError("give a rate, a max_concurrency, or both")
    warm, measured = requests[:spec.warmup], requests[spec.warmup:]
    if warm:  # all at once, or at most max_concurrency outstanding; no time bound, no bar
        warm_spec = dataclasses.replace(spec, rate=None, max_concurrency=spec.max_concurrency or len(warm),
                                        duration_s=None, progress=False)
        await _measure(backend, [dataclasses.replace(r, arrival_s=None) for r in warm], warm_spec)
    return await _measure(backend, measured, spec)


async def _measure(backend: Backend, requests: list[BenchRequest], spec: LoadSpec) -> RunResult:
    limit = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
    results: list[RequestResult | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=not spec.progress, desc=_label(spec), leave=False)

    async def one(i: int) -> None:
        async with limit if limit is not None else contextlib.nullcontext():
            results[i] = await backend.send(requests[i])
        bar.update(1)

    start = time.perf_counter()
    sender = asyncio.ensure_future(_send_all(requests, spec, one))
    try:
        await asyncio.wait_for(asyncio.shield(sender), spec.duration_s)
    except asyncio.TimeoutError:
        pass
    finally:
        await _cancel(sender)
        bar.close()
    done = [r for r in results if r is not None]
    return RunResult(done, time.perf_counter() - start, len(requests) - len(done))


async def _send_all(requests: list[BenchRequest], spec: LoadSpec, one) -> None:
    """Start each request at its time (trace offsets, else the arrival gaps) and wait for all of them."""
    tasks = []
    t0 = time.perf_counter()
    try:
        for i, at in enumerate(send_times(requests, spec)):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def send_times(requests: list[BenchRequest], spec: LoadSpec) -> list[float]:
    """Offsets (s) from the start: the trace's where requests carry them, else cumulative gaps."""
    if requests and requests[0].arrival_s is not None:  # from the first one sent (warm-up left out)
        return [r.arrival_s - requests[0].arrival_s for r in requests]
    if spec.rate is None:
        return [0.0] * len(requests)
    gaps = arrival_gaps(len(requests), spec.rate, spec.burstiness, spec.seed)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


async def _cancel(task: asyncio.Future) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _label(spec: LoadSpec) -> str:
    return f"rate {spec.rate:g}/s" if spec.rate is not None else f"concurrency {spec.max_concurrency}"
