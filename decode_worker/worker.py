"""The decode worker: leases blocks for prompts computed elsewhere, receives their KV into them on the
transfer's own threads (running steps never wait), and admits each sequence into the running batch once its
KV is in and prefill's first token is known. Aborts free a sequence's blocks wherever it is.

A lease ends one of three ways: admitted (KV DONE and first token known), dropped (aborted, or KV DONE
but no first token within the deadline), or failed (its transfer failed or timed out: the receiver hands
the blocks back once nothing can still write into them).
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import ray

from pdserve.cluster.engine_worker import EngineWorker
from pdserve.cluster.transfer import make_transfer_config, transport_kind
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode
from pdserve.kv_transfer import Destination, KVLayout, KVReceiver, TransferState
from pdserve.messages import Reservation


@dataclass
class Lease:
    request_id: str
    transfer_id: int
    block_ids: tuple[int, ...]
    deadline: float  # monotonic: the KV and the first token must both be here by then
    arrived: bool = False  # the transfer is DONE
    first_token: int | None = None
    aborted: bool = False


class DecodeWorker(EngineWorker):
    role = "decode"

    def setup(self) -> None:
        runner = self.engine.runner
        layout = KVLayout.of_cache(runner.kv_cache, self.config.model, self.engine.spec.num_kv_heads, 1, 0)
        self._released: queue.SimpleQueue[tuple[int, ...]] = queue.SimpleQueue()
        self.receiver = KVReceiver(layout, runner.kv_cache, self._on_release, transport_kind(self.config),
                                   host=ray.util.get_node_ip_address(), config=make_transfer_config(self.config))
        self.leases: dict[str, Lease] = {}
        self.by_transfer: dict[int, Lease] = {}
        self.by_blocks: dict[tuple[int, ...], Lease] = {}

    def teardown(self) -> None:
        self.receiver.close()

    def destination(self) -> Destination:
        return Destination((self.receiver.endpoint,))

    def _on_release(self, block_ids: list[int]) -> None:
        """Transfer thread: a failed transfer's blocks can no longer be written; the loop frees them."""
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
        self.leases[request_id] = self.by_transfer[transfer_id] = self.by_blocks[ids] = lease
        return Reservation(request_id, transfer_id, self.destination(), ids)

    def start(self, request_id: str, first_token: int) -> None:
        """Prefill sampled `first_token`: decode from it once the KV is in."""
        self.call(lambda: self._start(request_id, first_token))

    def _start(self, request_id: str, first_token: int) -> None:
        lease = self.leases.get(request_id)
        if lease is None or lease.aborted:
            return  # its transfer failed meanwhile (the router has the failure) or it was aborted
        lease.first_token = first_token
        if lease.arrived:
            self._admit(lease)

    def on_abort(self, request_id: str) -> None:
        lease = self.leases.get(request_id)
        if lease is None:
            super().on_abort(request_id)
        elif lease.arrived:
            self._drop(lease)
        elif not lease.aborted:
            lease.aborted = True
            # Nothing received yet: fail it now (the blocks come back through _on_release). Otherwise the
            # transfer ends on its own, within its deadline, and the lease is dropped then.
            if self.receiver.state(lease.transfer_id) is TransferState.WAITING:
                self.receiver.cancel(lease.transfer_id, "aborted")

    # --- the loop's hooks ------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.leases)

    def before_step(self) -> None:
        for result in self.receiver.get_finished():
            lease = self.by_transfer.pop(result.transfer_id, None)
            if lease is None:
                continue
            ok = result.state is TransferState.DONE
            self.transferred(lease.request_id, ok, result.num_bytes, result.duration_s)
            if not ok:  # the blocks come back through _on_release
                if not lease.aborted:
                    self.fail(lease.request_id, ErrorCode.UNAVAILABLE.grpc_name,
                              f"KV transfer failed: {result.error}")
                lease.aborted = True
                continue
            lease.arrived = True
            if lease.aborted:
                self._drop(lease)
            elif lease.first_token is not None:
                self._admit(lease)
        while not self._released.empty():
            lease = self.by_blocks.pop(self._released.get(), None)
            if lease is not None:
                self.leases.pop(lease.request_id, None)
                self.engine.drop_reserved(lease.request_id)
        self._expire()

    def _expire(self) -> None:
        """A lease whose KV arrived but whose first token never came is dropped at its deadline (one whose
        KV never arrived fails by the receiver's own deadline)."""
        now = time.monotonic()
        for lease in [x for x in self.leases.values() if x.arrived and now > x.deadline]:
            self._drop(lease)
            self.fail(lease.request_id, ErrorCode.UNAVAILABLE.grpc_name,
                      f"no first token within the lease ({self.config.kv_transfer.timeout_s:.0f}s)")

    def _admit(self, lease: Lease) -> None:
        self._forget(lease)
        self.engine.admit(lease.request_id, lease.first_token)

    def _drop(self, lease: Lease) -> None:
        self._forget(lease)
        self.engine.drop_reserved(lease.request_id)

    def _forget(self, lease: Lease) -> None:
        self.leases.pop(lease.request_id, None)
        self.by_blocks.pop(lease.block_ids, None)
        self.by_transfer.pop(lease.transfer_id, None)
