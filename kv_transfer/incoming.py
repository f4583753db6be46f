"""One expected transfer as its receiving rank sees it (KVReceiver's record, shared with the pair threads)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from pdserve.kv_transfer.messages import TransferState
from pdserve.kv_transfer.trace import NO_TRACE


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
