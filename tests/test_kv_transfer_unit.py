"""KV transfer without a second process: resharding and message plans, layout checks, deadlines."""
import threading
import time

import pytest
import torch

from pdserve.errors import TransferError
from pdserve.kv_transfer import (
    Destination,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferState,
    TransportKind,
    check_match,
    heads_of_rank,
    plan_sends,
)
from pdserve.kv_transfer.layout import message_shape
from pdserve.kv_transfer.messages import Endpoint, TransferHeader, message_plan


def make_layout(tp_size=1, tp_rank=0, num_kv_heads=4, **overrides) -> KVLayout:
    fields = {"model": "tiny", "dtype": "bfloat16", "num_layers": 3, "block_size": 4, "head_dim": 8,
                  "num_kv_heads": num_kv_heads, "tp_size": tp_size, "tp_rank": tp_rank}
    return KVLayout(**{**fields, **overrides})


class BlockPool:
    """Stand-in for an engine's block pool: a thread-safe set of free ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks, self.free = num_blocks, set(range(num_blocks))
        self.lock = threading.Lock()

    def take(self, n: int) -> list[int]:
        with self.lock:
            ids = sorted(self.free)[::-1][:n]  # non-contiguous in general after a few rounds; reversed order
            self.free -= set(ids)
        return ids

    def give(self, ids: list[int]) -> None:
        with self.lock:
            assert not self.free & set(ids), "block released twice"
            self.free |= set(ids)

    @property
    def full(self) -> bool:
        return len(self.free) == self.num_blocks


@pytest.mark.parametrize("num_kv_heads,src_tp,dst_tp", [
    (8, 1, 1), (8, 1, 2), (8, 2, 1), (8, 2, 4), (8, 4, 2), (8, 8, 2),
    (2, 4, 2), (2, 1, 4), (2, 4, 1), (1, 2, 4),
])
def test_plan_gives_every_receiving_rank_each_of_its_heads_exactly_once(num_kv_heads, src_tp, dst_tp):
    got = {r: [] for r in range(dst_tp)}
    for s in range(src_tp):
        src = make_layout(src_tp, s, num_kv_heads)
        for piece in plan_sends(src, dst_tp):
            assert src.heads[0] <= piece.heads[0] < piece.heads[1] <= src.heads[1]  # it holds what it sends
            got[piece.dst_rank].extend(range(*piece.heads))
    for r in range(dst_tp):
        assert sorted(got[r]) == list(range(*heads_of_rank(num_kv_heads, dst_tp, r)))


def test_heads_of_rank_replicates_when_heads_are_fewer_than_ranks():
    assert [heads_of_rank(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert heads_of_rank(8, 2, 1) == (4, 8)
    # Uneven: earlier ranks hold one more head, as the engine's QKV layer loads them.
    assert [heads_of_rank(6, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 6)]
    with pytest.raises(TransferError, match="tp_size 4 is not a multiple of num_kv_heads 3"):
        heads_of_rank(3, 4, 0)


@pytest.mark.parametrize("num_blocks,max_bytes", [(1, 512), (5, 512), (10, 4096), (10, 1 << 20), (7, 1024)])
def test_message_plan_covers_each_layer_and_block_once_within_staging(num_blocks, max_bytes):
    layout = make_layout()
    lpm, bpm = message_shape(layout, num_blocks, 2, max_bytes)
    parts = message_plan(layout.num_layers, TransferHeader(1, num_blocks, (0, 2), lpm, bpm))
    unit = 2 * 2 * layout.block_size * layout.head_dim * 2
    covered = [(ly, b) for p in parts for ly in range(*p.layers) for b in range(*p.blocks)]
    assert sorted(covered) == [(ly, b) for ly in range(layout.num_layers) for b in range(num_blocks)]
    assert all(p.num_units(1) * unit <= max_bytes for p in parts)


def test_layout_mismatch_names_the_field():
    with pytest.raises(TransferError, match="'head_dim'.*decode has 8.*prefill has 16"):
        check_match(make_layout(), make_layout(head_dim=16), "decode", "prefill")
    check_match(make_layout(2, 1), make_layout(1, 0), "decode", "prefill")  # TP placement may differ


def _caches(num_blocks=16):
    src = torch.randn(3, 2, num_blocks, 4, 4, 8).to(torch.bfloat16)
    return src, torch.zeros_like(src)


@pytest.mark.parametrize("transport", [TransportKind.TORCH, TransportKind.GRPC])
def test_in_process_transfer_whole_and_layer_by_layer(transport):
    src, dst = _caches()
    config = TransferConfig(timeout_s=20, staging_bytes=2048)
    send_pool, recv_pool = BlockPool(16), BlockPool(16)
    receiver = KVReceiver(make_layout(), dst, recv_pool.give, transport, config=config)
    sender = KVSender(make_layout(), src, send_pool.give, config=config)
    try:
        for tid, layerwise in [(1, False), (2, True)]:
            src_ids, dst_ids = send_pool.take(5), recv_pool.take(5)
            receiver.expect(tid, dst_ids)
            sender.start_send(tid, Destination((receiver.endpoint,)), src_ids)
            for layer in range(3) if layerwise else []:
                sender.save_kv_layer(tid, layer)
            if not layerwise:
                sender.save_kv(tid)
            assert receiver.wait(tid, 20).state is TransferState.DONE
            assert sender.wait_for_save(tid, 20).state is TransferState.DONE
            assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
            recv_pool.give(dst_ids)
        assert send_pool.full and recv_pool.full
        assert [r.transfer_id for r in receiver.get_finished()] == [1, 2]
    finally:
        sender.close()
        receiver.close()


def test_a_transfer_cancelled_before_its_sender_starts_leaves_the_pair_to_the_next_one():
    """An aborted request's transfer is cancelled at the receiver while its sender has not announced it yet;
    the sender sends it all the same, on the pair that the next transfer shares: the receiver reads and
    drops its messages, and the next transfer, right behind it, arrives whole over the same pair."""
    src, dst = _caches()
    config = TransferConfig(timeout_s=20, staging_bytes=2048)  # several messages per transfer
    send_pool, recv_pool = BlockPool(16), BlockPool(16)
    receiver = KVReceiver(make_layout(), dst, recv_pool.give, TransportKind.TORCH, config=config)
    sender = KVSender(make_layout(), src, send_pool.give, config=config)
    try:
        to = Destination((receiver.endpoint,))
        gone_src, gone_dst = send_pool.take(5), recv_pool.take(5)
        receiver.expect(1, gone_dst)
        assert receiver.cancel(1, "aborted")  # nothing announced yet: it fails now, its blocks come back
        assert recv_pool.full
        keep_src, keep_dst = send_pool.take(5), recv_pool.take(5)
        receiver.expect(2, keep_dst)
        for tid, ids in [(1, gone_src), (2, keep_src)]:
            sender.start_send(tid, to, ids)
            sender.save_kv(tid)
        assert receiver.wait(2, 20).state is TransferState.DONE
        assert torch.equal(dst[:, :, keep_dst], src[:, :, keep_src])
        assert sender.wait_for_save(2, 20).state is TransferState.DONE
        stats = receiver.stats.snapshot()
        assert (stats["transfers_drained"], stats["groups_created"], stats["groups_torn_down"]) == (1, 1, 0)
        recv_pool.give(keep_dst)
        assert send_pool.full and recv_pool.full
    finally:
        sender.close()
        receiver.close()


def test_a_transfer_its_pair_thread_never_ends_is_ended_past_its_deadline(monkeypatch):
    """Whatever becomes of the thread that moves a transfer, the sender ends it (failed, blocks released)
    once it is STUCK_GRACE_S past its deadline."""
    from pdserve.kv_transfer import sender as sender_module
    from pdserve.kv_transfer.pair_worker import PairWorker

    monkeypatch.setattr(PairWorker, "submit", lambda self, out, part: None)  # taken, never moved
    monkeypatch.setattr(sender_module, "STUCK_GRACE_S", 0.1)
    src, _ = _caches()
    pool = BlockPool(16)
    sender = KVSender(make_layout(), src, pool.give, config=TransferConfig(timeout_s=0.1))
    try:
        ids = pool.take(4)
        sender.start_send(3, Destination((Endpoint(TransportKind.TORCH, "127.0.0.1", 1),)), ids)
        assert sender.get_finished() == [] and not sender.state(3).finished
        time.sleep(0.25)
        [result] = sender.get_finished()
        assert (result.transfer_id, result.state, result.error) == (3, TransferState.FAILED,
                                                                    "it did not end within its deadline")
        assert pool.full
    finally:
        sender.close()


def test_expected_transfer_that_never_comes_fails_at_its_deadline_and_returns_blocks():
    _, dst = _caches()
    pool = BlockPool(16)
    receiver = KVReceiver(make_layout(), dst, pool.give, TransportKind.GRPC)
    try:
        start = time.monotonic()
        receiver.expect(7, pool.take(4), timeout_s=0.3)
        assert receiver.state(7) is TransferState.WAITING
        result = receiver.wait(7, 5)
        assert result.state is TransferState.FAILED and "timed out" in result.error
        assert time.monotonic() - start < 1.0
        assert pool.full
        assert receiver.stats.snapshot()["transfers_failed"] == 1
    finally:
        receiver.close()
