"""The decode worker: leases blocks for prompts computed elsewhere, receives their KV into them on the
transfer's own threads (running steps never wait), and admits each sequence into the running batch once its
KV is in and prefill's first token is known. Aborts free a sequence's blocks wherever it is.

A lease ends one of three ways: admitted (every rank's part DONE and the first token known), dropped
(aborted, or its KV in but no first token within the deadline), or failed (some rank's part failed or timed
out: the blocks go back once no rank's transfer can still write into them). Under TP rank 0 tells the other
ranks what to expect through the step channel (KV_EXPECT, KV_CANCEL) and collects how their parts ended.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import torch

from pdserve.cluster.engine_worker import EngineWorker
from pdserve.cluster.kv_rank import KV_CANCEL, KV_EXPECT, expect_message
from pdserve.cluster.transfer import make_receiver
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode
from pdserve.kv_transfer import Destination, TransferState
from pdserve.messages import Reservation


@dataclass
class Lease:
    request_id: str
    transfer_id: int
    block_ids: tuple[int, ...]
    deadline: float  # monotonic: the KV and the first token must both be here by then
    done_ranks: int = 0
    ended_ranks: int = 0  # ranks whose part can no longer write: done, or failed and released
    failed: str | None = None
    reported: bool = False
    first_token: int | None = None
    aborted: bool = False


class DecodeWorker(EngineWorker):
    role = "decode"

    def setup(self) -> None:
        runner = self.engine.runner
        self._released: queue.SimpleQueue[tuple[int, ...]] = queue.SimpleQueue()
        self.receiver = make_receiver(runner.kv_cache, self.config, self.engine.spec.num_kv_heads, self.tp_size, 0,
                                      self._on_release)
        self.endpoints = [self.receiver.endpoint]
        self.leases: dict[str, Lease] = {}
        self.by_transfer: dict[int, Lease] = {}
        self.by_blocks: dict[tuple[int, ...], Lease] = {}

    def set_peer_endpoints(self, endpoints: list) -> None:
        """Under TP: the other ranks' receiving endpoints, in rank order (the gang's Destination)."""
        self.endpoints = [self.receiver.endpoint, *endpoints]

    def teardown(self) -> None:
        self.receiver.close()

    def destination(self) -> Destination:
        return Destination(tuple(self.endpoints))

    def _on_release(self, block_ids: list[int]) -> None:
        """Transfer thread: a failed transfer's blocks can no longer be written by rank 0; the loop decides."""
        self._released.put(tuple(block_ids))
        self._wake.set()

    # --- router-facing ---------------------------------------------------------------------------
    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                transfer_id: int) -> Reservation | None:
        """Lease blocks for the prompt's KV; None when they are not free now (the router waits, retries)."""
        return self.call(lambda: self._reserve(request_id, prompt_token_ids, params, transfer_id))

    def _reserve(self, request_id, prompt_token_ids, params, transfer_id) -> Reservation | None:
        # room for the prompt and the first decode step, so an admitted sequence can run at once
        if not self.engine.can_reserve(len(prompt_token_ids) + 1):
            return None
        ids = tuple(self.engine.reserve(prompt_token_ids, params, request_id))
        timeout = self.config.kv_transfer.timeout_s
        lease = Lease(request_id, transfer_id, ids, time.monotonic() + timeout)
        self.receiver.expect(transfer_id, list(ids), timeout)
        if self.tp_size > 1:
            self.publish(KV_EXPECT, expect_message(transfer_id, timeout, list(ids)))
        self.leases[request_id] = self.by_transfer[transfer_id] = self.by_blocks[ids] = lease
        return Reservation(request_id, transfer_id, self.destination(), ids)

    def start(self, request_id: str, first_token: int) -> None:
        """Prefill sampled `first_token`: decode from it once the KV is in."""
        self.call(lambda: self._start(request_id, first_token))

    def _start(self, request_id: str, first_token: int) -> None:
        lease = self.leases.get(request_id)
        if lease is None or lease.aborted or lease.failed:
            return  # its transfer failed meanwhile (the router has the failure) or it was aborted
        lease.first_token = first_token
        self._settle(lease)

    def on_abort(self, request_id: str) -> None:
        lease = self.leases.get(request_id)
        if lease is None:
            super().on_abort(request_id)
            return
        lease.aborted = True
        # Nothing received yet: fail it now on every rank (the blocks come back as each rank releases them).
        # Otherwise the transfer ends on its own, within its deadline, and the lease is dropped then.
        if self.receiver.state(lease.transfer_id) is TransferState.WAITING:
            self.receiver.cancel(lease.transfer_id, "aborted")
            if self.tp_size > 1:
                self.publish(KV_CANCEL, torch.tensor([lease.transfer_id], dtype=torch.int64))
        self._settle(lease)

    # --- the loop's hooks ------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.leases)

    def before_step(self) -> None:
        for r in self.receiver.get_finished():
            lease = self.by_transfer.get(r.transfer_id)  # NOTE: before _part_ended, which may admit and forget it
            self._part_ended(r.transfer_id, r.state is TransferState.DONE, r.error, rank0=True)
            if lease is not None:
                self.transferred(lease.request_id, r.state is TransferState.DONE, r.num_bytes, r.duration_s)
        while not self._released.empty():
            lease = self.by_blocks.get(self._released.get())
            if lease is not None:
                lease.ended_ranks += 1
                self._settle(lease)
        for tid, done, error in self.peer_results():
            self._part_ended(tid, done, error, rank0=False)
        self._expire()

    def _part_ended(self, tid: int, done: bool, error: str | None, rank0: bool) -> None:
        lease = self.by_transfer.get(tid)
        if lease is None:
            return
        if done:
            lease.done_ranks += 1
            lease.ended_ranks += 1
        else:
            lease.failed = lease.failed or error or "failed"
            lease.ended_ranks += 0 if rank0 else 1  # rank 0's part ends when its blocks are released
        self._settle(lease)

    def _settle(self, lease: Lease) -> None:
        """Move a lease on as far as what is known allows."""
        if lease.failed is not None:
            if not lease.reported and not lease.aborted:
                lease.reported = True
                self.fail(lease.request_id, ErrorCode.UNAVAILABLE.grpc_name, f"KV transfer failed: {lease.failed}",
                          retry=True)
            if lease.ended_ranks == self.tp_size:
                self._drop(lease)
        elif lease.done_ranks == self.tp_size:
            if lease.aborted:
                self._drop(lease)
            elif lease.first_token is not None:
                self._forget(lease)
                self.engine.admit(lease.request_id, lease.first_token)
        elif lease.aborted and lease.ended_ranks == self.tp_size:
            self._drop(lease)

    def _expire(self) -> None:
        """A lease whose KV arrived but whose first token never came is dropped at its deadline (one whose
        KV never arrived fails by the receivers' own deadlines)."""
        now = time.monotonic()
        for lease in [x for x in self.leases.values() if x.done_ranks == self.tp_size and now > x.deadline]:
            self._drop(lease)
            self.fail(lease.request_id, ErrorCode.UNAVAILABLE.grpc_name,
                      f"no first token within the lease ({self.config.kv_transfer.timeout_s:.0f}s)")

    def _drop(self, lease: Lease) -> None:
        self._forget(lease)
        self.engine.drop_reserved(lease.request_id)

    def _forget(self, lease: Lease) -> None:
        self.leases.pop(lease.request_id, None)
        self.by_blocks.pop(lease.block_ids, None)
        self.by_transfer.pop(lease.transfer_id, None)
