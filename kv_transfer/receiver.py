"""Decode side: expect a transfer into reserved blocks; report its state without blocking the step loop."""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import torch

from pdserve.errors import TransferError, TransferGone
from pdserve.kernels import block_copy, ops
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.messages import (
    Endpoint,
    MessagePart,
    TransferConfig,
    TransferHeader,
    TransferResult,
    TransferState,
    TransferStats,
    TransportKind,
)
from pdserve.kv_transfer.records import FINISHED_KEPT, Incoming, TransferLedger
from pdserve.kv_transfer.staging import StagingPool, copy_programs, device_index, pinned_index
from pdserve.kv_transfer.trace import NO_TRACE, Trace, start_trace
from pdserve.kv_transfer.transport import open_ingest

ReleaseBlocks = Callable[[list[int]], None]


class KVReceiver:
    """Worker-side half on one decode rank, over one transport.

    The scheduler calls expect() for blocks it reserved, then polls state() / get_finished() each step.
    Transports deliver messages on their own threads (a side CUDA stream on GPU), so no step waits.
    On failure the destination blocks go back through `release_blocks` (called from a transfer thread);
    on success they hold the KV and belong to the caller's sequence.
    """

    def __init__(self, layout: KVLayout, kv_cache: torch.Tensor, release_blocks: ReleaseBlocks,
                 transport: TransportKind | tuple[TransportKind, ...], host: str = "127.0.0.1",
                 config: TransferConfig | None = None):
        """`transport`: the kind senders use, or several in order of preference (`transport: auto`: IPC for
        senders that can write into this rank's GPU, NCCL for the others); one ingest listens for each."""
        # kv_cache: [L, 2, num_blocks, H_local, Bs, D]
        self.layout, self.kv_cache, self.config = layout, kv_cache, config or TransferConfig()
        self.stats = TransferStats()
        self.staging = StagingPool(self.config.staging_buffers, self.config.staging_bytes, kv_cache.device)
        self.copy_programs = copy_programs(kv_cache.device, self.config.copy_sm_fraction)
        block_copy.load_kernels(kv_cache)  # before any transfer can keep the GPU busy
        self._release = release_blocks
        self._lock = threading.Condition()
        self._book = TransferLedger(self._lock, "receiver")
        self._rejected: collections.OrderedDict[int, str] = collections.OrderedDict()
        self._quarantine: list[Incoming] = []  # failed, waiting for enqueued scatters before release
        self._conn_ids = iter(range(1, 1 << 62))
        self._closed = threading.Event()
        self._traced = 0  # traced transfers expected and not finished (pairs then trace their headers)
        # where the pairs' header traces record events: the last traced transfer's (None: host stamps only)
        self._trace_device = None if self.config.trace == "host" else kv_cache.device
        kinds = transport if isinstance(transport, tuple) else (transport,)
        self._ingests = [open_ingest(kind, self, host) for kind in kinds]
        self._watchdog = threading.Thread(target=self._watch, name="kv-recv-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def endpoint(self) -> Endpoint:
        """Where senders reach this rank: the first kind's endpoint, each next kind's as its fallback."""
        endpoint = None
        for ingest in reversed(self._ingests):
            endpoint = dataclasses.replace(ingest.endpoint, fallback=endpoint)
        return endpoint

    # ---- scheduler-facing ----------------------------------------------------------------------------
    def expect(self, transfer_id: int, block_ids: list[int], timeout_s: float | None = None,
               trace: bool | str | None = None) -> None:
        """Wait for `transfer_id` to fill `block_ids` (reserved by the caller) within the deadline.
        `trace`: record its timeline (True, or "host": host stamps only; default: config.trace)."""
        tr = start_trace(self.config.trace if trace is None else trace, "recv", self.kv_cache.device,
                         "expect called")
        n = len(block_ids)
        units = self.layout.num_layers * self.layout.num_local_heads * n
        inc = Incoming(transfer_id, list(block_ids), time.monotonic() + (timeout_s or self.config.timeout_s),
                       units_left=units, units_unclaimed=units, trace=tr)
        if self.kv_cache.is_cuda:  # the host half of device_index now, off the transfer's critical path
            inc.pinned_ids = pinned_index(inc.block_ids)
        with self._lock:
            self._book.add(transfer_id, inc)
            self._traced += tr.enabled
            if tr.enabled:
                self._trace_device = tr.device
            rejected = self._rejected.pop(transfer_id, None)
            self._lock.notify_all()
        tr.mark("expect: pair threads woken")
        self.stats.add(transfers_started=1)
        if rejected is not None:
            self._fail(inc, rejected)

    def await_unclaimed(self, timeout_s: float, stop: threading.Event) -> bool:
        """Transports: block (bounded, or until `stop` is set and wake() called) until some expected transfer
        has parts that no received header has announced yet.

        NOTE: NCCL pairs post the receive for their next header only then (torch_ingest), so that an idle
        pair never leaves an NCCL kernel waiting on this GPU.
        """
        def ready() -> bool:
            return stop.is_set() or any(inc.units_unclaimed > 0 for inc in self._book.active.values())

        with self._lock:
            return self._lock.wait_for(ready, timeout_s) and not stop.is_set()

    def pending_trace(self):
        """Transports: where a pair marks a header's stages before it knows the transfer (Trace.absorb then
        moves them); NO_TRACE unless a traced transfer is expected."""
        if self._traced or self.config.trace:
            return Trace("recv", self._trace_device, anchor=False)
        return NO_TRACE

    def wake(self) -> None:
        """Wake transport threads blocked in await_unclaimed (after setting their `stop`)."""
        with self._lock:
            self._lock.notify_all()

    def state(self, transfer_id: int) -> TransferState | None:
        """Non-blocking. None for an id never expected (or finished long ago)."""
        return self._book.state(transfer_id)

    def get_finished(self) -> list[TransferResult]:
        """Non-blocking: transfers that ended (DONE or FAILED, with the reason) since the last call."""
        return self._book.get_finished()

    def wait(self, transfer_id: int, timeout_s: float) -> TransferResult:
        """Block (bounded) until the transfer ends; for callers that may block, such as tests and tools."""
        return self._book.wait(transfer_id, timeout_s, "did not finish")

    def cancel(self, transfer_id: int, reason: str) -> bool:
        """Fail an expected transfer that no sender has announced yet (its request was aborted); its blocks
        come back through `release_blocks`. False when it is not waiting: a transfer already under way ends on
        its own (done, or failed by its deadline), so the pairs it shares with other transfers stay up."""
        with self._lock:
            inc = self._book.active.get(transfer_id)
            if inc is None or inc.conns or inc.state is not TransferState.WAITING:
                return False
        self._fail(inc, reason)
        return True

    def close(self) -> None:
        self._closed.set()
        for ingest in self._ingests:
            ingest.close()
        with self._lock:
            active = list(self._book.active.values())
        for inc in active:
            self._fail(inc, "receiver closed")

    # ---- transport-facing ----------------------------------------------------------------------------
    def new_conn_id(self) -> int:
        with self._lock:
            return next(self._conn_ids)

    def reject(self, transfer_id: int, reason: str) -> None:
        """A handshake for `transfer_id` was refused: fail it now, or as soon as it is expected."""
        self.stats.add(handshakes_refused=1)
        with self._lock:
            inc = self._book.active.get(transfer_id)
            if inc is None:
                self._rejected[transfer_id] = reason
                while len(self._rejected) > FINISHED_KEPT:
                    self._rejected.popitem(last=False)
        if inc is not None:
            self._fail(inc, reason)

    def open_part(self, conn_id: int, header: TransferHeader) -> Incoming:
        """The expectation a sender's part belongs to; waits (bounded) for expect() if the sender is early."""
        deadline = time.monotonic() + self.config.timeout_s
        with self._lock:
            while (inc := self._book.active.get(header.transfer_id)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or header.transfer_id in self._book.finished:
                    raise TransferGone(f"transfer {header.transfer_id} is not expected by this receiver")
                self._lock.wait(left)
            inc.conns.add(conn_id)
            num_heads = header.heads[1] - header.heads[0]
            inc.units_unclaimed -= header.num_blocks * self.layout.num_layers * num_heads
        hs, he = self.layout.heads
        if header.num_blocks != len(inc.block_ids) or not hs <= header.heads[0] < header.heads[1] <= he:
            reason = (f"transfer {header.transfer_id}: sender ships {header.num_blocks} blocks of heads "
                      f"{header.heads}, receiver expects {len(inc.block_ids)} blocks of heads "
                      f"{self.layout.heads}")
            self._fail(inc, reason)
            raise TransferError(reason)
        return inc

    def part_shape(self, header: TransferHeader, part: MessagePart) -> tuple[int, ...]:
        """Shape of one message's payload: [Lm, 2, nm, Hm, Bs, D]."""
        return (part.layers[1] - part.layers[0], 2, part.blocks[1] - part.blocks[0],
                header.heads[1] - header.heads[0], self.layout.block_size, self.layout.head_dim)

    def scatter(self, inc: Incoming, header: TransferHeader, part: MessagePart, buf: torch.Tensor) -> bool:
        """Write one received message into the reserved blocks (enqueued, on CUDA); False if it already ended.

        The caller reports the message with landed() once the scatter has run.
        """
        hs = self.layout.heads[0]
        heads = (header.heads[0] - hs, header.heads[1] - hs)  # global -> this rank's local head indices
        with inc.lock:
            if inc.state.finished:
                return False
            inc.state = TransferState.TRANSFERRING
            if inc.block_index is None:  # here, on the transfer's stream: the step loop's stream never waits
                ids = inc.pinned_ids if inc.pinned_ids is not None else inc.block_ids
                inc.block_index = device_index(ids, self.kv_cache.device)
            index = inc.block_index[part.blocks[0]:part.blocks[1]]
            inc.launching += 1
        # NOTE: launched outside inc.lock: a launch that blocks in the driver (a kernel's module loaded while a
        # receive from a dead peer keeps the GPU busy) must not keep _fail from ending the transfer on time.
        # `launching` keeps the blocks out of the pool until the scatter is accounted for.
        event, launched = None, False
        try:
            ops.scatter_blocks(buf, self.kv_cache, index, part.layers, heads, self.copy_programs)
            if buf.is_cuda:
                event = torch.cuda.Event()
                event.record()
            launched = True
        finally:
            with inc.lock:
                inc.launching -= 1
                if event is not None:
                    inc.scatters[torch.cuda.current_stream().stream_id] = event
                if launched:
                    inc.num_bytes += buf.numel() * buf.element_size()
        return True

    def landed(self, inc: Incoming, header: TransferHeader, parts: list[MessagePart]) -> None:
        """These scattered messages are in the blocks (CUDA: their scatters ran); DONE once all have."""
        units = sum(p.num_units(header.heads[1] - header.heads[0]) for p in parts)
        with inc.lock:
            if inc.state.finished:
                return
            inc.units_left -= units
            if inc.units_left:
                return
            inc.state = TransferState.DONE
        self._finish(inc, TransferState.DONE, None)

    def hold(self, inc: Incoming) -> None:
        """Direct transports: a sender may write the transfer's blocks from now on. They stay out of the pool,
        even if the transfer fails, until the transport hands them back (`inc.launching -= 1`, under
        `inc.lock`) once that sender's writes are over; TransferError if the transfer already ended."""
        with inc.lock:
            if inc.state.finished:
                raise TransferError(f"transfer {inc.transfer_id} already ended")
            inc.state = TransferState.TRANSFERRING
            inc.launching += 1

    def fail_part(self, inc: Incoming, reason: str) -> None:
        """A sender gave up its part of the transfer: it fails now rather than at its deadline."""
        self._fail(inc, reason)

    def conn_lost(self, conn_id: int, reason: str) -> None:
        """A pair broke: the transfers it was delivering cannot complete."""
        with self._lock:
            hit = [inc for inc in self._book.active.values() if conn_id in inc.conns]
        for inc in hit:
            self._fail(inc, f"connection to the sender was lost: {reason}")

    # ---- internals -----------------------------------------------------------------------------------
    def _fail(self, inc: Incoming, reason: str) -> None:
        with inc.lock:
            if inc.state.finished:
                return
            inc.state = TransferState.FAILED
        # The caller learns first; tearing the pairs down may take longer (an NCCL abort).
        self._finish(inc, TransferState.FAILED, reason)
        for conn_id in inc.conns:  # pair ids are unique across this receiver's ingests
            for ingest in self._ingests:
                ingest.drop_conn(conn_id)
        if not inc.scatters_done():
            with self._lock:
                self._quarantine.append(inc)
        else:
            self._release(inc.block_ids)

    def _finish(self, inc: Incoming, state: TransferState, error: str | None) -> None:
        # The caller has already moved inc.state to `state` under inc.lock (so exactly one caller gets here).
        inc.trace.mark("DONE (finished_at)" if state is TransferState.DONE else "FAILED")
        now = time.monotonic()
        result = TransferResult(inc.transfer_id, state, inc.num_bytes, now - inc.start, now, error,
                                inc.trace if inc.trace.enabled else None)
        with self._lock:
            self._traced -= inc.trace.enabled
        self._book.close_out(result)
        self.stats.record_finish(result)

    def _watch(self) -> None:
        """Enforce deadlines and release quarantined blocks; every 10 ms."""
        while not self._closed.wait(0.01):
            now = time.monotonic()
            with self._lock:
                active = list(self._book.active.values())
                quarantine, self._quarantine = self._quarantine, []
            for inc in active:
                if now > inc.deadline:
                    missing = f"{inc.units_left} (layer, head, block) units missing"
                    self._fail(inc, f"timed out after {now - inc.start:.1f}s ({missing})")
            for inc in quarantine:
                if inc.scatters_done():
                    self._release(inc.block_ids)
                else:
                    with self._lock:
                        self._quarantine.append(inc)
