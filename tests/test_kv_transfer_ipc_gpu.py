"""The IPC transport between processes on one GPU: senders in child processes write into caches of this
process. Exact blocks (whole and layer-wise sends, 1->2 and 2->1 kv-head resharding, non-contiguous block
ids), and a sender killed mid-transfer failing the receiver's transfer within its deadline, blocks returned."""
from __future__ import annotations

import time

import pytest
import torch
import torch.multiprocessing as mp
from test_kv_transfer_unit import BlockPool, make_layout

from pdserve.kv_transfer import Destination, KVReceiver, KVSender, TransferConfig, TransferState, TransportKind

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

HEADS, NUM_BLOCKS = 4, 64
CONFIG = TransferConfig(timeout_s=10, connect_timeout_s=10)


def source_cache(tp_size: int, rank: int) -> torch.Tensor:
    """[L, 2, N, H_local, Bs, D] on the GPU, the same in every process for one (tp_size, rank)."""
    gen = torch.Generator().manual_seed(1000 * tp_size + rank)
    host = torch.randn(3, 2, NUM_BLOCKS, HEADS // tp_size, 4, 8, generator=gen).to(torch.bfloat16)
    return host.cuda()


def sender_main(tp_size, rank, dest, transfers, results, stop_after_layer=None):
    """A prefill rank: sends `transfers` [(id, block ids, layerwise)]; reports each result's state."""
    torch.cuda.set_device(0)
    sender = KVSender(make_layout(tp_size, rank, HEADS), source_cache(tp_size, rank), lambda ids: None,
                      config=CONFIG)
    for tid, ids, layerwise in transfers:
        sender.start_send(tid, dest, ids)
        if stop_after_layer is not None:
            sender.save_kv_layer(tid, 0)
            results.put(("saved", tid))
            time.sleep(60)  # "prefill" of the next layers: killed here
        for layer in range(3) if layerwise else []:
            sender.save_kv_layer(tid, layer)
        if not layerwise:
            sender.save_kv(tid)
        result = sender.wait_for_save(tid, 10)
        results.put((tid, result.error or result.state.value))
    sender.close()


def spawn(*args, **kwargs):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=sender_main, args=(*args, results), kwargs=kwargs, daemon=True)
    proc.start()
    return proc, results


def receivers(tp_size, pool):
    caches = [torch.zeros(3, 2, NUM_BLOCKS, HEADS // tp_size, 4, 8, dtype=torch.bfloat16, device="cuda")
              for _ in range(tp_size)]
    ends = [KVReceiver(make_layout(tp_size, r, HEADS), caches[r], pool.give, TransportKind.IPC, config=CONFIG)
            for r in range(tp_size)]
    return caches, ends, Destination(tuple(e.endpoint for e in ends))


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 1), (1, 2), (2, 1)])
def test_ipc_transfers_are_bit_equal(src_tp, dst_tp):
    pool = BlockPool(NUM_BLOCKS)
    caches, ends, dest = receivers(dst_tp, pool)
    transfers = [(1, [5, 40, 2, 17, 9, 33], False), (2, [60, 1, 22, 8], True), (3, list(range(63, 31, -1)), False)]
    expected = {}
    for tid, src_ids, _ in transfers:
        expected[tid] = (src_ids, pool.take(len(src_ids)))
        for end in ends:
            end.expect(tid, expected[tid][1])
    procs = [spawn(src_tp, r, dest, transfers) for r in range(src_tp)]
    try:
        for _, results in procs:
            got = dict(results.get(timeout=60) for _ in transfers)
            assert got == {tid: "done" for tid, _, _ in transfers}
        src = torch.cat([source_cache(src_tp, r) for r in range(src_tp)], dim=3)
        dst = torch.cat(caches, dim=3)
        for tid, (src_ids, dst_ids) in expected.items():
            assert all(e.wait(tid, 10).state is TransferState.DONE for e in ends)
            assert torch.equal(dst[:, :, dst_ids], src[:, :, src_ids])
    finally:
        for proc, _ in procs:
            proc.join(timeout=20)
        for end in ends:
            end.close()


def test_sender_killed_mid_transfer_fails_the_receiver_within_its_deadline_and_returns_blocks():
    pool = BlockPool(NUM_BLOCKS)
    _, [receiver], dest = receivers(1, pool)
    try:
        receiver.expect(1, pool.take(8), timeout_s=8)
        proc, results = spawn(1, 0, dest, [(1, list(range(8)), True)], stop_after_layer=0)
        assert results.get(timeout=60) == ("saved", 1)
        deadline = time.monotonic() + 10
        while receiver.state(1) is not TransferState.TRANSFERRING and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        proc.kill()
        result = receiver.wait(1, 10)
        assert result.state is TransferState.FAILED, result
        assert time.monotonic() - start < 8
        while not pool.full and time.monotonic() < start + 8:
            time.sleep(0.01)
        assert pool.full
    finally:
        receiver.close()
