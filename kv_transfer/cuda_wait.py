"""Waiting for CUDA work on a transfer thread: the host blocks in the driver, a deadline stays enforced.

A plain `event.synchronize()` wakes within microseconds of the event (no sleep between polls, and the GIL
is released while it waits) but has no deadline. `sync_event` arms a guard first: past the deadline the
guard thread runs `on_expire`, which aborts the pair's NCCL communicator; the aborted NCCL kernels end,
the event completes, the wait returns, and sync_event raises TransferError.
"""
from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable

import torch

from pdserve.errors import TransferError


class _Guard:
    """One daemon thread running callbacks at their deadlines unless disarmed first."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, Callable[[], None]] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, on_expire: Callable[[], None]) -> int:
        with self._cond:
            token = next(self._ids)
            self._armed[token] = on_expire
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kv-deadline-guard", daemon=True)
                self._thread.start()
            self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """True if the callback already ran (the deadline passed)."""
        with self._cond:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
            return False

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                callback = self._armed.pop(token)
                self._fired.add(token)
            # On a thread of its own: a callback that blocks (an NCCL abort can) must not hold up the other
            # waits' deadlines, which this one thread serves for the whole process.
            threading.Thread(target=_run_quietly, args=(callback,), name="kv-deadline-expired", daemon=True).start()


def _run_quietly(callback: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):  # best effort: the waiter reports the deadline itself
        callback()


_GUARD = _Guard()


def sync_event(event: torch.cuda.Event, deadline: float, on_expire: Callable[[], None], what: str) -> None:
    """Block until `event` completes; past `deadline` run `on_expire` (it must make the event complete, e.g.
    by aborting the NCCL communicator the work waits on) and raise TransferError.

    NOTE: the event's flags choose how the host waits: a default event spins in the driver (wakes within
    microseconds; for waits as short as a transfer), `torch.cuda.Event(blocking=True)` sleeps until the GPU
    signals it (for waits that may last long, such as a header that comes when the sender starts).
    """
    if event.query():
        return
    token = _GUARD.arm(deadline, on_expire)
    try:
        event.synchronize()  # releases the GIL while it waits
    finally:
        expired = _GUARD.disarm(token)
    if expired:
        raise TransferError(f"{what} did not complete within its deadline")
