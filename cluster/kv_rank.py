"""KV transfer under tensor parallelism: every rank moves its own kv heads.

Rank 0 (the worker actor) decides; it tells the other ranks what to do through the gang's step channel,
in order with the steps: KV_EXPECT (decode: receive a transfer into these blocks) and KV_SEND (prefill:
ship these blocks to that destination, starting with the next step, layer by layer). Each rank > 0 reports
how its part of each transfer ended; rank 0 collects those reports without blocking its loop
(`PeerTransfers`), and a transfer is DONE only when every rank's part is.
"""
from __future__ import annotations

import contextlib
import queue

import ray
import torch

from pdserve.cluster.tp_rank import STOP, TPRank
from pdserve.cluster.transfer import make_receiver, make_sender
from pdserve.engine.step import StepBatch
from pdserve.errors import TransferError
from pdserve.kv_transfer import Destination, TransferState

KV_EXPECT, KV_SEND, KV_CANCEL = 2, 3, 4


def expect_message(transfer_id: int, timeout_s: float, block_ids: list[int]) -> torch.Tensor:
    return torch.tensor([transfer_id, int(timeout_s * 1000), *block_ids], dtype=torch.int64)


def send_message(transfer_id: int, destination_index: int, block_ids: list[int]) -> torch.Tensor:
    return torch.tensor([transfer_id, destination_index, *block_ids], dtype=torch.int64)


class ServingRank(TPRank):
    """Rank > 0 of a prefill or decode worker's gang: runs rank 0's steps, sends or receives its heads."""

    def __init__(self, config: dict, rank: int, size: int, role: str, destinations: list[Destination]):
        super().__init__(config, rank, size)
        self.role, self.destinations = role, destinations
        self.kv = None
        self._ended: queue.SimpleQueue[tuple[int, bool, str | None]] = queue.SimpleQueue()
        self._by_blocks: dict[tuple[int, ...], int] = {}

    def add_destination(self, destination: Destination) -> None:
        self.destinations.append(destination)

    def load(self) -> dict:
        info = super().load()
        spec, runner = self.runner.spec, self.runner
        if self.role == "colocated":
            return info
        if self.role == "decode":
            self.kv = make_receiver(runner.kv_cache, self.config, spec.num_kv_heads, self.size, self.rank,
                                    self._released)
            info["endpoint"] = self.kv.endpoint
        else:
            self.kv = make_sender(runner.kv_cache, self.config, spec.num_kv_heads, self.size, self.rank)
        return info

    def serve_steps(self) -> int:
        steps, sending = 0, []
        while True:
            command, flat = self.channel.receive(self.rank - 1)
            if command == STOP:
                if self.kv is not None:
                    self.kv.close()
                self._leave_group()
                return steps
            if command == KV_EXPECT:
                tid, timeout_ms, *ids = flat.tolist()
                self._by_blocks[tuple(ids)] = tid
                self.kv.expect(tid, ids, timeout_ms / 1000)
            elif command == KV_CANCEL:
                self.kv.cancel(int(flat[0]), "aborted")
            elif command == KV_SEND:
                tid, dest, *ids = flat.tolist()
                self.kv.start_send(tid, self.destinations[dest], ids)
                sending.append(tid)
            else:
                hook = layer_saver(self.kv, sending) if sending else None
                self.runner.forward(StepBatch.unpack(flat), layer_hook=hook)
                sending = []
                steps += 1

    def _released(self, block_ids: list[int]) -> None:
        """Decode: a failed transfer's blocks can no longer be written by this rank."""
        tid = self._by_blocks.pop(tuple(block_ids), None)
        if tid is not None:
            self._ended.put((tid, False, "failed on a peer rank"))

    def finished_transfers(self) -> list[tuple[int, bool, str | None]]:
        """(transfer id, done, error) of this rank's parts that ended since the last call. A failed receive
        is reported once its blocks can no longer be written."""
        out = []
        if self.kv is None:  # still loading
            return out
        for result in self.kv.get_finished():
            if result.state is TransferState.DONE:
                if self.role == "decode":
                    self._by_blocks = {k: v for k, v in self._by_blocks.items() if v != result.transfer_id}
                out.append((result.transfer_id, True, None))
            elif self.role == "prefill":
                out.append((result.transfer_id, False, result.error))
        while not self._ended.empty():
            out.append(self._ended.get())
        return out


def layer_saver(sender, transfer_ids: list[int]):
    """The model's layer hook for a step that completes these transfers' prompts: marks each layer written."""
    def saved(layer: int) -> None:
        for tid in transfer_ids:
            # one that already failed (its result says why) must not stop the step
            with contextlib.suppress(TransferError):
                sender.save_kv_layer(tid, layer)
    return saved


class PeerTransfers:
    """Rank 0's view of its peers' transfer reports: one call in flight per peer, never waited on."""

    def __init__(self, peers: list):
        self.peers = peers
        self._calls: dict[int, object] = {}

    def poll(self) -> list[tuple[int, bool, str | None]]:
        for i, peer in enumerate(self.peers):
            if i not in self._calls:
                self._calls[i] = peer.finished_transfers.remote()
        ready, _ = ray.wait(list(self._calls.values()), num_returns=len(self._calls), timeout=0)
        out = []
        for i in [i for i, ref in self._calls.items() if ref in ready]:
            out += ray.get(self._calls.pop(i))
        return out
