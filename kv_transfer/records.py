"""The records each side keeps of its transfers: the receiver's `Incoming` (one expected transfer, shared with
the pair threads), and the ledger both sides use (active transfers, and recently finished ones whose state stays
answerable)."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.errors import TransferError
from pdserve.kv_transfer.messages import TransferResult, TransferState
from pdserve.kv_transfer.trace import NO_TRACE

FINISHED_KEPT = 4096  # finished transfers whose state() stays answerable


class TransferLedger:
    """Shared by the sender and the receiver. Guarded by the side's own condition `lock`, which
    other waits of that side (e.g. the receiver's `await_unclaimed`) use as well."""

    def __init__(self, lock: threading.Condition, side: str):
        self.lock, self.side = lock, side
        self.active: dict[int, object] = {}  # transfer id -> the side's record (has `.state`)
        self.finished: collections.OrderedDict[int, TransferResult] = collections.OrderedDict()
        self._uncollected: list[TransferResult] = []

    def add(self, transfer_id: int, record) -> None:
        """Caller holds `lock`. An id is used once per side."""
        if transfer_id in self.active or transfer_id in self.finished:
            raise TransferError(f"transfer {transfer_id} is already known to this {self.side}")
        self.active[transfer_id] = record

    def state(self, transfer_id: int) -> TransferState | None:
        """Non-blocking. None for an id never seen (or finished long ago)."""
        with self.lock:
            if transfer_id in self.active:
                return self.active[transfer_id].state
            result = self.finished.get(transfer_id)
            return result.state if result else None

    def get_finished(self) -> list[TransferResult]:
        """Non-blocking: transfers that ended (DONE or FAILED, with the reason) since the last call."""
        with self.lock:
            out, self._uncollected = self._uncollected, []
        return out

    def wait(self, transfer_id: int, timeout_s: float, what: str) -> TransferResult:
        """Block (bounded) until the transfer ends; `what` completes "transfer N ... within T s"."""
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while transfer_id not in self.finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError(f"transfer {transfer_id} {what} within {timeout_s}s")
                self.lock.wait(left)
            return self.finished[transfer_id]

    def close_out(self, result: TransferResult) -> None:
        """Move a transfer from active to finished and wake its waiters."""
        with self.lock:
            self.active.pop(result.transfer_id, None)
            self.finished[result.transfer_id] = result
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)
            self._uncollected.append(result)
            self.lock.notify_all()


@dataclass
class Incoming:
    transfer_id: int
    block_ids: list[int]
    deadline: float
    units_left: int  # (layer, head, block) triples still to arrive
    units_unclaimed: int = 0  # triples no received header has announced yet (a pair may still bring them)
    start: float = field(default_factory=time.monotonic)
    state: TransferState = TransferState.WAITING
    num_bytes: int = 0
    conns: set[int] = field(default_factory=set)
    # CUDA: the latest scatter enqueued on each side stream (one per pair delivering to this transfer)
    scatters: dict[int, torch.cuda.Event] = field(default_factory=dict)
    launching: int = 0  # scatters being launched right now (outside `lock`): their blocks are not free yet
    lock: threading.Lock = field(default_factory=threading.Lock)  # orders scatters against failure
    pinned_ids: torch.Tensor | None = None  # CUDA: [n] int64 in pinned host memory, made by expect()
    block_index: torch.Tensor | None = None  # [n] int64 on the cache's device, made by the first scatter
    trace: object = NO_TRACE  # a kv_transfer.trace.Trace when traced

    def scatters_done(self) -> bool:
        with self.lock:
            return not self.launching and all(event.query() for event in self.scatters.values())
