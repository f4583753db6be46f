"""Per-transfer timelines: a host stamp, and optionally a CUDA event, at each stage of a transfer.

Off by default (`TransferConfig.trace`, or `trace=` per call). A transfer that is not traced carries
NO_TRACE, whose mark() does nothing: no clock read, no event, no allocation.

Host stamps are `time.monotonic_ns()` (CLOCK_MONOTONIC: one clock for every process of a host, so the two
ends of a transfer line up). A mark with `gpu=True` also records a timing CUDA event on a stream (the
current one unless given): when the GPU reached that point of the stream. After the transfer, timeline()
turns each event into nanoseconds on the host clock: the trace's anchor event is recorded when the trace
starts, on an idle stream of its own (so the GPU passes it right after its host stamp), and an
event's device time is the anchor's host stamp plus the elapsed GPU time between the two.

A "host" trace (TransferConfig.trace = "host") keeps the host stamps only: no CUDA event at all, so the
trace costs each stage a clock read instead of an event record, and the timeline has no device times.

NOTE: read timeline() only after the transfer ended (its events then completed); an event that has not
completed is reported without a device time rather than waited for.
"""
from __future__ import annotations

import threading
import time

import torch

_IDLE_STREAMS: dict[int, torch.cuda.Stream] = {}
_IDLE_LOCK = threading.Lock()


def _idle_stream(device: torch.device) -> torch.cuda.Stream:
    """A stream that carries nothing but anchor events (one per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _IDLE_LOCK:
        stream = _IDLE_STREAMS.get(index)
        if stream is None:
            stream = _IDLE_STREAMS[index] = torch.cuda.Stream(index)
        return stream


class Trace:
    """The marks of one transfer on one side (sender or receiver); see the module docstring."""

    enabled = True

    def __init__(self, side: str, device: torch.device | None, first: str | None = None, anchor: bool = True):
        # device None: host stamps only
        self.side, self.device = side, device
        self.cuda = device is not None and device.type == "cuda"
        self.t0_ns = time.monotonic_ns()
        self.anchor: torch.cuda.Event | None = None
        if anchor and self.cuda:
            self.anchor = torch.cuda.Event(enable_timing=True)
            self.anchor.record(_idle_stream(device))
        # (stage, index or None, host ns, timing event or None, thread name)
        self.marks: list[tuple[str, int | None, int, torch.cuda.Event | None, str]] = []
        if first is not None:
            self.marks.append((first, None, self.t0_ns, None, threading.current_thread().name))

    def mark(self, stage: str, k: int | None = None, gpu: bool = False,
             stream: torch.cuda.Stream | None = None) -> None:
        """Stamp `stage` (of message `k`) now; with gpu, also when the GPU gets there on `stream`."""
        now = time.monotonic_ns()
        event = None
        if gpu and self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(stream)
        self.marks.append((stage, k, now, event, threading.current_thread().name))

    def absorb(self, other: Trace) -> None:
        """Take the marks of `other` (made on the same device before the transfer was known)."""
        if other.enabled:
            self.marks.extend(other.marks)

    def timeline(self) -> list[dict]:
        """Marks in host order: side, stage, k, host_ns, device_ns (host clock; None without an event),
        thread. Call after the transfer ended."""
        rows = []
        for stage, k, host_ns, event, thread in sorted(self.marks, key=lambda m: m[2]):
            device_ns = None
            if event is not None and self.anchor is not None and event.query():
                device_ns = self.t0_ns + round(self.anchor.elapsed_time(event) * 1e6)
            rows.append({"side": self.side, "stage": stage, "k": k, "host_ns": host_ns,
                         "device_ns": device_ns, "thread": thread})
        return rows


class _NoTrace:
    """A transfer that is not traced: every call does nothing."""

    enabled = False
    marks: tuple = ()

    def mark(self, stage: str, k: int | None = None, gpu: bool = False, stream=None) -> None:
        pass

    def absorb(self, other) -> None:
        pass


NO_TRACE = _NoTrace()


def start_trace(mode: bool | str, side: str, device: torch.device, first: str):
    """A Trace starting with the stage `first`: with CUDA events (mode True), host stamps only ("host"), or
    NO_TRACE (False)."""
    if not mode:
        return NO_TRACE
    return Trace(side, None if mode == "host" else device, first)
