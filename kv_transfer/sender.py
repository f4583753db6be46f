"""Prefill side: ship the KV of a set of blocks, whole or layer by layer as prefill writes it."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.errors import TransferError
from pdserve.kernels import block_copy
from pdserve.kv_transfer.layout import KVLayout, plan_sends
from pdserve.kv_transfer.messages import (
    Destination,
    TransferConfig,
    TransferResult,
    TransferState,
    TransferStats,
)
from pdserve.kv_transfer.pair_worker import PairWorker
from pdserve.kv_transfer.records import TransferLedger
from pdserve.kv_transfer.staging import StagingPool, copy_programs
from pdserve.kv_transfer.trace import NO_TRACE, start_trace

ReleaseBlocks = Callable[[list[int]], None]
# A transfer not ended by its pair thread this long past its deadline is ended by `get_finished` (the thread
# bounds its own waits by the deadline; this bounds what nothing else would: a thread that lost track of it).
STUCK_GRACE_S = 5.0


@dataclass
class Outgoing:
    """One transfer as its sending rank sees it; shared by the pair workers carrying its slices."""

    transfer_id: int
    block_ids: list[int]
    deadline: float
    parts_left: int  # slices (one per receiving rank) not yet sent
    start: float = field(default_factory=time.monotonic)
    state: TransferState = TransferState.WAITING
    num_bytes: int = 0
    layers_ready: int = 0
    # CUDA: per saved layer, the event recorded when it was saved (layers saved together share one)
    layer_events: list = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    trace: object = NO_TRACE  # a kv_transfer.trace.Trace when traced

    def poll_layers(self, upto: int, seconds: float) -> bool:
        """True if layers [0, upto) are saved, polling for at most `seconds` (each poll yields the GIL, so a
        caller that saves them right after start_send gets through first)."""
        until = time.monotonic() + seconds
        while self.layers_ready < upto and not self.state.finished:
            if time.monotonic() >= until:
                return False
            time.sleep(0)
        return self.layers_ready >= upto

    def wait_layers(self, start: int, upto: int, deadline: float, spin_until: float = 0.0) -> None:
        """Block (bounded) until layers [0, upto) are saved; on CUDA the current stream waits on the events
        of layers [start, upto) (the caller's stream already waits on those before `start`). Until
        `spin_until` (monotonic) it polls rather than sleeps."""
        while self.layers_ready < upto and not self.state.finished and time.monotonic() < spin_until:
            time.sleep(0)  # a plain read: the condition below settles it under the lock
        with self.cond:
            while self.layers_ready < upto and not self.state.finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError(f"layers up to {upto} were not saved within the deadline")
                self.cond.wait(left)
            if self.state.finished:
                raise TransferError(f"transfer {self.transfer_id} ended on another pair")
            events = self.layer_events[start:upto]
        last = None
        for event in events:
            if event is not None and event is not last:
                torch.cuda.current_stream().wait_event(event)
            last = event


class KVSender:
    """Worker-side half on one prefill rank.

    start_send() names the blocks and the destination gang; save_kv_layer() marks each layer written (in
    order, as prefill produces them) and save_kv() marks all at once. Each receiving rank of the plan gets
    its heads over a cached pair, in the order transfers were started. Neither call blocks on the network.
    Source blocks go back through `release_blocks` when the transfer ends, done or failed.
    """

    def __init__(self, layout: KVLayout, kv_cache: torch.Tensor, release_blocks: ReleaseBlocks,
                 config: TransferConfig | None = None):
        # kv_cache: [L, 2, num_blocks, H_local, Bs, D]
        self.layout, self.kv_cache, self.config = layout, kv_cache, config or TransferConfig()
        self.stats = TransferStats()
        self.staging = StagingPool(self.config.staging_buffers, self.config.staging_bytes, kv_cache.device)
        self.copy_programs = copy_programs(kv_cache.device, self.config.copy_sm_fraction)
        block_copy.load_kernels(kv_cache)  # before any transfer can keep the GPU busy
        self._release = release_blocks
        self._lock = threading.Condition()
        self._book = TransferLedger(self._lock, "sender")
        self._workers: dict = {}  # Endpoint -> PairWorker

    def start_send(self, transfer_id: int, dest: Destination, block_ids: list[int],
                   timeout_s: float | None = None, trace: bool | str | None = None) -> None:
        """Register a transfer of `block_ids` to the gang `dest`; nothing moves until layers are saved.
        `trace`: record its timeline (True, or "host": host stamps only; default: config.trace)."""
        tr = start_trace(self.config.trace if trace is None else trace, "send", self.kv_cache.device,
                         "start_send called")
        slices = plan_sends(self.layout, len(dest.endpoints))
        deadline = time.monotonic() + (timeout_s or self.config.timeout_s)
        out = Outgoing(transfer_id, list(block_ids), deadline, parts_left=len(slices), trace=tr)
        tr.mark("plan built")
        with self._lock:
            self._book.add(transfer_id, out)
            for s in slices:
                self._worker(dest.endpoints[s.dst_rank], s.dst_rank, len(dest.endpoints)).submit(out, s)
        tr.mark("queued to pair threads")
        self.stats.add(transfers_started=1)
        if not slices:  # this rank holds no head that the chosen plan takes from it
            self._finish(out, TransferState.DONE, None)

    def save_kv_layer(self, transfer_id: int, layer: int) -> None:
        """Layer `layer` of the transfer's blocks is written (by work enqueued on the current stream)."""
        self._save(transfer_id, layer, layer + 1)

    def save_kv(self, transfer_id: int) -> None:
        """All remaining layers are written: send them as a whole (in as few messages as staging allows)."""
        self._save(transfer_id, None, self.layout.num_layers)

    def _save(self, transfer_id: int, first: int | None, upto: int) -> None:
        """Layers [first, upto) are written; first None: whatever was not saved yet. One event for all."""
        out = self._get(transfer_id)
        event = None
        if self.kv_cache.is_cuda:
            event = torch.cuda.Event()
            event.record()
        # device: when the saving stream got here (the layers were written)
        out.trace.mark("save_kv called | layers written" if first is None else "save_kv_layer called | written",
                       first, gpu=True)
        with out.cond:
            if first is not None and first != out.layers_ready:
                raise TransferError(f"transfer {transfer_id}: layer {first} saved, "
                                    f"layer {out.layers_ready} expected")
            if upto <= out.layers_ready:
                return
            out.layer_events.extend([event] * (upto - out.layers_ready))
            out.layers_ready = upto
            out.cond.notify_all()

    def state(self, transfer_id: int) -> TransferState | None:
        return self._book.state(transfer_id)

    def wait_for_save(self, transfer_id: int, timeout_s: float) -> TransferResult:
        """Block (bounded) until every message of the transfer has been sent, or it failed."""
        return self._book.wait(transfer_id, timeout_s, "was not sent")

    def get_finished(self) -> list[TransferResult]:
        """Non-blocking: transfers that ended since the last call. One that its pair thread has not ended
        STUCK_GRACE_S past its deadline is ended here, failed: every transfer ends (and its blocks come back),
        whatever became of that thread."""
        now = time.monotonic()
        with self._lock:
            overdue = [out for out in self._book.active.values() if now > out.deadline + STUCK_GRACE_S]
        for out in overdue:
            self._finish(out, TransferState.FAILED, "it did not end within its deadline")
        return self._book.get_finished()

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.stop()

    # ---- called by pair workers ----------------------------------------------------------------------
    def part_done(self, out: Outgoing, num_bytes: int) -> None:
        with out.cond:
            out.num_bytes += num_bytes
            out.parts_left -= 1
            done = out.parts_left == 0 and not out.state.finished
        if done:
            self._finish(out, TransferState.DONE, None)

    def fail(self, out: Outgoing, reason: str) -> None:
        self._finish(out, TransferState.FAILED, reason)

    def retire(self, worker: PairWorker) -> bool:
        """An idle worker leaves, unless a transfer was queued on it meanwhile."""
        with self._lock:
            if worker.has_work():
                return False
            self._workers.pop(worker.endpoint, None)
            return True

    # ---- internals -----------------------------------------------------------------------------------
    def _worker(self, endpoint, dst_rank: int, dst_tp_size: int) -> PairWorker:
        worker = self._workers.get(endpoint)
        if worker is None:
            worker = self._workers[endpoint] = PairWorker(self, endpoint, dst_rank, dst_tp_size)
        return worker

    def _get(self, transfer_id: int) -> Outgoing:
        with self._lock:
            out = self._book.active.get(transfer_id)
        if out is None:
            raise TransferError(f"transfer {transfer_id} is not active on this sender")
        return out

    def _finish(self, out: Outgoing, state: TransferState, error: str | None) -> None:
        with out.cond:
            if out.state.finished:
                return
            out.state = state
            out.cond.notify_all()
        out.trace.mark(state.name)
        now = time.monotonic()
        result = TransferResult(out.transfer_id, state, out.num_bytes, now - out.start, now, error,
                                out.trace if out.trace.enabled else None)
        self._book.close_out(result)
        self.stats.record_finish(result)
        self._release(out.block_ids)
