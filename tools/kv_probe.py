"""The machine's own host latencies, measured at the start of each benchmark process (`--trace`), so a
transfer's timeline can be read against them: how long a thread hand-off through a condition variable
takes (how the transfer's threads are woken), with and without another thread running Python; what an
event wait costs once the event completed, and how late it returns after the GPU gets there (spinning and
blocking events); a timing event's record; a TCPStore round trip.

Every figure is in µs: the median, and the 90th percentile where it varies.
"""
from __future__ import annotations

import sys
import threading
import time

import torch


def _us(ns: list[int]) -> dict[str, float]:
    ns = sorted(ns)
    return {"p50": ns[len(ns) // 2] / 1e3, "p90": ns[int(len(ns) * 0.9)] / 1e3, "max": ns[-1] / 1e3}


def _per_call_us(fn, n: int) -> float:
    """Mean µs per call of `fn` over n calls (after one call to warm it up)."""
    fn()
    t = time.monotonic_ns()
    for _ in range(n):
        fn()
    return (time.monotonic_ns() - t) / n / 1e3


def cond_handoff(reps: int, busy: bool = False) -> dict[str, float]:
    """notify() on one thread -> the waiter's return from Condition.wait(timeout), as PairWorker.submit and
    KVReceiver.expect wake their transfer threads. busy: a third thread runs a Python loop meanwhile (the
    waiter then needs the GIL back from it: sys.getswitchinterval())."""
    cond, box, lat = threading.Condition(), [], []
    stop = threading.Event()

    def waiter():
        while not stop.is_set():
            with cond:
                while not box and not stop.is_set():
                    cond.wait(1.0)
                if box:
                    lat.append(time.monotonic_ns() - box.pop())

    def spin():
        x = 0
        while not stop.is_set():
            x += 1

    threads = [threading.Thread(target=waiter, daemon=True)] + ([threading.Thread(target=spin, daemon=True)]
                                                                 if busy else [])
    for t in threads:
        t.start()
    time.sleep(0.01)
    for _ in range(reps):
        with cond:
            box.append(time.monotonic_ns())
            cond.notify()
        while box:  # until the waiter took it
            time.sleep(0.0002)
        time.sleep(0.0003)
    stop.set()
    with cond:
        cond.notify_all()
    for t in threads:
        t.join(timeout=2)
    return _us(lat)


def _wake_after_gpu(device: torch.device, blocking: bool, reps: int) -> dict[str, float]:
    """How late event.synchronize() returns after the GPU passed the event: host time from launching a
    ~0.3 ms sleep kernel on an idle stream to the return, minus the kernel's GPU time (an upper bound:
    it includes the launch)."""
    stream, lat = torch.cuda.Stream(device), []
    with torch.cuda.stream(stream):
        for _ in range(reps):
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True, blocking=blocking)
            t = time.monotonic_ns()
            begin.record()
            torch.cuda._sleep(500_000)
            end.record()
            end.synchronize()
            lat.append(time.monotonic_ns() - t - round(begin.elapsed_time(end) * 1e6))
    return _us(lat)


def _idle_anchor(device: torch.device, reps: int) -> dict[str, float]:
    """Record on an idle stream -> query() first sees it done (bounds how far a trace's device times may
    sit from its host times)."""
    stream, lat = torch.cuda.Stream(device), []
    for _ in range(reps):
        event = torch.cuda.Event()
        t = time.monotonic_ns()
        event.record(stream)
        while not event.query():
            pass
        lat.append(time.monotonic_ns() - t)
    return _us(lat)


def host_latencies(device: torch.device, store) -> dict:
    """Every probe of this module; `store`: a TCPStore client of the one the transfer pairs use."""
    out: dict = {"gil_switch_interval_us": sys.getswitchinterval() * 1e6,
                 "cond_handoff_us": cond_handoff(200), "cond_handoff_busy_thread_us": cond_handoff(20, True)}
    store.set("probe/key", "x")
    store_rt = []
    for _ in range(200):
        t = time.monotonic_ns()
        store.get("probe/key")
        store_rt.append(time.monotonic_ns() - t)
    out["store_get_us"] = _us(store_rt)
    if device.type == "cuda":
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        out["event_sync_completed_us"] = _per_call_us(done.synchronize, 1000)
        out["event_query_completed_us"] = _per_call_us(done.query, 1000)
        timing = torch.cuda.Event(enable_timing=True)
        out["timing_event_record_us"] = _per_call_us(timing.record, 1000)
        torch.cuda.synchronize(device)
        out["idle_stream_event_seen_us"] = _idle_anchor(device, 50)
        out["sync_return_after_gpu_spin_us"] = _wake_after_gpu(device, False, 20)
        out["sync_return_after_gpu_blocking_us"] = _wake_after_gpu(device, True, 20)
        torch.cuda.synchronize(device)
    return out


def describe(role: str, p: dict) -> str:
    """One line for the log and the report."""
    def d(key: str) -> str:
        v = p[key]
        return f"{v['p50']:.0f}/{v['p90']:.0f}" if isinstance(v, dict) else f"{v:.1f}"

    line = (f"host latencies {role} (µs, p50/p90): cond hand-off {d('cond_handoff_us')}, with a busy "
            f"Python thread {d('cond_handoff_busy_thread_us')} (GIL switch interval "
            f"{p['gil_switch_interval_us']:.0f}); store get {d('store_get_us')}")
    if "event_sync_completed_us" in p:
        line += (f"; completed event: synchronize {d('event_sync_completed_us')}, query "
                 f"{d('event_query_completed_us')}; timing event record {d('timing_event_record_us')}; "
                 f"idle-stream event seen done {d('idle_stream_event_seen_us')}; synchronize returns after "
                 f"the GPU: spinning event {d('sync_return_after_gpu_spin_us')}, blocking event "
                 f"{d('sync_return_after_gpu_blocking_us')}")
    return line

