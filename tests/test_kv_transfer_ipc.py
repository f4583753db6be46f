"""The IPC transport without a GPU: the whole protocol in one process (a CPU cache is shared within its own
process), the handshake's refusals, and every failure path bounded. Peers outside the unit are fakes that
speak the control protocol over a real socket."""
import os
import socket
import time

import pytest
import torch
from test_kv_transfer_unit import BlockPool, make_layout

from pdserve.errors import TransferError
from pdserve.kv_transfer import (
    Destination,
    Endpoint,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferState,
    TransportKind,
)
from pdserve.kv_transfer.messages import Place
from pdserve.kv_transfer.place import choose, local_place, node_id
from pdserve.kv_transfer.share import open_cache, share_cache
from pdserve.kv_transfer.wire import recv_msg, send_msg

CONFIG = TransferConfig(timeout_s=5, connect_timeout_s=2, idle_timeout_s=2)


def _cache(num_heads=4, num_blocks=16):
    return torch.randn(3, 2, num_blocks, num_heads, 4, 8).to(torch.bfloat16)


def _send(sender, tid, dest, src_ids, layerwise):
    sender.start_send(tid, dest, src_ids)
    for layer in range(3) if layerwise else []:
        sender.save_kv_layer(tid, layer)
    if not layerwise:
        sender.save_kv(tid)


@pytest.mark.parametrize("layerwise", [False, True])
def test_whole_and_layerwise_transfers_land_bit_equal_in_non_contiguous_blocks(layerwise):
    src, dst = _cache(), torch.zeros(3, 2, 16, 4, 4, 8, dtype=torch.bfloat16)
    recv_pool = BlockPool(16)
    receiver = KVReceiver(make_layout(), dst, recv_pool.give, TransportKind.IPC, config=CONFIG)
    sender = KVSender(make_layout(), src, lambda ids: None, config=CONFIG)
    try:
        for tid in (1, 2):
            src_ids, dst_ids = [3, 11, 0, 7, 5], recv_pool.take(5)
            receiver.expect(tid, dst_ids)
            _send(sender, tid, Destination((receiver.endpoint,)), src_ids, layerwise)
            result = receiver.wait(tid, 5)
            assert result.state is TransferState.DONE, result.error
            assert result.num_bytes == 3 * 2 * 5 * 4 * 4 * 8 * 2
            assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
            assert sender.wait_for_save(tid, 5).state is TransferState.DONE
            recv_pool.give(dst_ids)
        assert recv_pool.full and sender.stats.snapshot()["groups_created"] == 1  # one pair, kept
    finally:
        sender.close()
        receiver.close()


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 2), (2, 1)])
def test_resharding_moves_each_head_once(src_tp, dst_tp):
    heads = 4
    srcs = [_cache(heads // src_tp) for _ in range(src_tp)]
    dsts = [torch.zeros(3, 2, 16, heads // dst_tp, 4, 8, dtype=torch.bfloat16) for _ in range(dst_tp)]
    pool = BlockPool(16)
    receivers = [KVReceiver(make_layout(dst_tp, r), dsts[r], pool.give, TransportKind.IPC, config=CONFIG)
                 for r in range(dst_tp)]
    senders = [KVSender(make_layout(src_tp, r), srcs[r], lambda ids: None, config=CONFIG) for r in range(src_tp)]
    try:
        src_ids, dst_ids = [9, 2, 14], [1, 8, 4]
        for receiver in receivers:
            receiver.expect(1, dst_ids)
        dest = Destination(tuple(r.endpoint for r in receivers))
        for sender in senders:
            _send(sender, 1, dest, src_ids, layerwise=False)
        assert all(r.wait(1, 5).state is TransferState.DONE for r in receivers)
        whole_src = torch.cat([s[:, :, src_ids] for s in srcs], dim=3)
        assert torch.equal(torch.cat([d[:, :, dst_ids] for d in dsts], dim=3), whole_src)
    finally:
        for end in (*senders, *receivers):
            end.close()


def test_layout_mismatch_is_refused_on_both_sides_and_returns_the_blocks():
    pool, send_pool = BlockPool(16), BlockPool(16)
    receiver = KVReceiver(make_layout(), torch.zeros(3, 2, 16, 4, 4, 8, dtype=torch.bfloat16), pool.give,
                          TransportKind.IPC, config=CONFIG)
    sender = KVSender(make_layout(head_dim=16), torch.zeros(3, 2, 16, 4, 4, 16, dtype=torch.bfloat16),
                      send_pool.give, config=CONFIG)
    try:
        receiver.expect(4, pool.take(2))
        sender.start_send(4, Destination((receiver.endpoint,)), send_pool.take(2))
        sender.save_kv(4)
        for result in (receiver.wait(4, 5), sender.wait_for_save(4, 5)):
            assert result.state is TransferState.FAILED
            assert "'head_dim'" in result.error and "has 8" in result.error and "has 16" in result.error
        assert pool.full and send_pool.full
        assert receiver.stats.snapshot()["handshakes_refused"] == 1
    finally:
        sender.close()
        receiver.close()


def _fake_sender(endpoint: Endpoint, tid: int, num_blocks: int):
    """A sender process, as the receiver sees it: connected and begun, writing nothing."""
    sock = socket.create_connection((endpoint.host, endpoint.port), timeout=2)
    send_msg(sock, {"op": "connect", "layout": make_layout().to_dict(), "transfer_id": tid})
    assert recv_msg(sock, time.monotonic() + 2)["error"] is None
    send_msg(sock, {"op": "begin", "transfer_id": tid, "num_blocks": num_blocks, "heads": [0, 4]})
    assert len(recv_msg(sock, time.monotonic() + 2)["block_ids"]) == num_blocks
    return sock


def test_a_sender_gone_mid_transfer_fails_it_at_once_and_returns_the_blocks():
    pool = BlockPool(16)
    receiver = KVReceiver(make_layout(), _cache(), pool.give, TransportKind.IPC, config=CONFIG)
    try:
        receiver.expect(1, pool.take(3), timeout_s=30)
        sock = _fake_sender(receiver.endpoint, 1, 3)
        start = time.monotonic()
        sock.close()  # as when its process dies
        result = receiver.wait(1, 5)
        assert result.state is TransferState.FAILED and "connection to the sender was lost" in result.error
        assert time.monotonic() - start < 1.0
        deadline = time.monotonic() + 1
        while not pool.full and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.full
    finally:
        receiver.close()


def test_blocks_a_silent_sender_may_write_stay_held_past_the_deadline_until_it_ends():
    pool = BlockPool(16)
    receiver = KVReceiver(make_layout(), _cache(), pool.give, TransportKind.IPC, config=CONFIG)
    try:
        receiver.expect(2, pool.take(3), timeout_s=0.3)
        sock = _fake_sender(receiver.endpoint, 2, 3)
        result = receiver.wait(2, 5)
        assert result.state is TransferState.FAILED and "timed out" in result.error
        time.sleep(0.1)
        assert not pool.full  # the sender may still be writing them
        send_msg(sock, {"op": "end", "transfer_id": 2, "ok": False, "num_bytes": 0, "error": "deadline"})
        deadline = time.monotonic() + 1
        while not pool.full and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.full
        sock.close()
    finally:
        receiver.close()


def test_a_receiver_gone_fails_the_send_within_its_deadline_and_the_mapping_is_dropped():
    listener = socket.create_server(("127.0.0.1", 0))
    endpoint = Endpoint(TransportKind.IPC, "127.0.0.1", listener.getsockname()[1], local_place(torch.device("cpu")))
    dst = _cache()

    def fake_receiver():  # answers the handshake, then dies before the transfer's begin is answered
        conn, _ = listener.accept()
        recv_msg(conn, time.monotonic() + 2)
        send_msg(conn, {"layout": make_layout().to_dict(), "conn_id": 1, "error": None, "cache": share_cache(dst)})
        recv_msg(conn, time.monotonic() + 2)
        conn.close()

    import threading
    threading.Thread(target=fake_receiver, daemon=True).start()
    send_pool = BlockPool(16)
    sender = KVSender(make_layout(), _cache(), send_pool.give, config=CONFIG)
    try:
        start = time.monotonic()
        sender.start_send(1, Destination((endpoint,)), send_pool.take(2))
        sender.save_kv(1)
        result = sender.wait_for_save(1, 5)
        assert result.state is TransferState.FAILED and "the peer closed the connection" in result.error
        assert time.monotonic() - start < 2.0 and send_pool.full
        assert sender.stats.snapshot()["groups_torn_down"] == 1
    finally:
        sender.close()
        listener.close()


def test_a_host_memory_share_from_another_process_is_refused():
    share = share_cache(_cache())
    with pytest.raises(TransferError, match="host memory of process .*needs a CUDA cache"):
        open_cache({**share, "pid": os.getpid() + 1}, torch.device("cpu"))


def test_choose_takes_ipc_only_where_it_reaches_and_falls_back_otherwise():
    nccl = Endpoint(TransportKind.TORCH, "10.0.0.2", 1)
    here = Endpoint(TransportKind.IPC, "127.0.0.1", 2, Place(node_id()), nccl)
    elsewhere = Endpoint(TransportKind.IPC, "10.0.0.2", 2, Place("other-node/boot"), nccl)
    cpu = torch.device("cpu")
    assert choose(here, cpu) is here
    assert choose(elsewhere, cpu) is nccl
    with pytest.raises(TransferError, match="no transport reaches the receiving rank at 10.0.0.2:2"):
        choose(Endpoint(TransportKind.IPC, "10.0.0.2", 2, Place("other-node/boot")), cpu)


def test_a_sender_that_closes_after_its_part_leaves_the_other_senders_parts_alone():
    """2 -> 1: the first sender's part lands and it closes its pair; the transfer still waits for the
    second sender's part, and completes."""
    srcs = [_cache(2), _cache(2)]
    dst = torch.zeros(3, 2, 16, 4, 4, 8, dtype=torch.bfloat16)
    receiver = KVReceiver(make_layout(), dst, lambda ids: None, TransportKind.IPC, config=CONFIG)
    senders = [KVSender(make_layout(2, r), srcs[r], lambda ids: None, config=CONFIG) for r in range(2)]
    try:
        receiver.expect(1, [4, 9])
        dest = Destination((receiver.endpoint,))
        _send(senders[0], 1, dest, [1, 2], layerwise=False)
        assert senders[0].wait_for_save(1, 5).state is TransferState.DONE
        senders[0].close()
        time.sleep(0.1)
        assert receiver.state(1) is TransferState.TRANSFERRING
        _send(senders[1], 1, dest, [1, 2], layerwise=False)
        assert receiver.wait(1, 5).state is TransferState.DONE
        assert torch.equal(dst[:, :, [4, 9]], torch.cat([s[:, :, [1, 2]] for s in srcs], dim=3))
    finally:
        senders[1].close()
        receiver.close()
