"""KV transfer between Ray actor processes over real gloo and gRPC on loopback (the acceptance tests)."""
import sys
import threading
import time

import pytest
import ray
import torch

from pdserve.kv_transfer import (
    Destination,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferState,
    TransportKind,
)

NUM_LAYERS, NUM_HEADS, BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 3, 4, 4, 8, 48
TRANSPORTS = [TransportKind.TORCH, TransportKind.GRPC]
# Small staging buffers, so transfers split into several messages (whole layers, and blocks within a layer).
CONFIG = TransferConfig(timeout_s=20, connect_timeout_s=10, idle_timeout_s=30, staging_bytes=2048)


def global_cache(seed: int) -> torch.Tensor:
    """The cache of a whole TP gang: [L, 2, N, H, Bs, D]; rank r holds its heads' slice."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, 2, NUM_BLOCKS, NUM_HEADS, BLOCK_SIZE, HEAD_DIM)
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


class KVRank:
    """One prefill or decode rank: its slice of a cache, a block pool stand-in, a sender or a receiver."""

    def setup(self, role: str, tp_size: int, tp_rank: int, transport=None, config=CONFIG, seed=0, device="cpu",
              **layout):
        if getattr(self, "end", None) is not None:
            self.end.close()
        base = KVLayout("tiny", "bfloat16", NUM_LAYERS, BLOCK_SIZE, HEAD_DIM, NUM_HEADS, tp_size, tp_rank)
        self.layout = KVLayout(**{**base.to_dict(), **layout})
        hs, he = self.layout.heads
        cache = global_cache(seed)[:, :, :, hs:he].clone().to(device)  # on a GPU actor "cuda" is its own GPU
        if role == "receiver":
            cache.zero_()
        if self.layout.head_dim != HEAD_DIM:
            cache = torch.zeros(*cache.shape[:-1], self.layout.head_dim, dtype=cache.dtype, device=device)
        self.cache, self.free, self.lock = cache, set(range(NUM_BLOCKS)), threading.Lock()
        if role == "receiver":
            self.end = KVReceiver(self.layout, cache, self.give, transport, config=config)
            return self.end.endpoint
        self.end = KVSender(self.layout, cache, self.give, config=config)
        return None

    def take(self, n: int, stride: int) -> list[int]:
        """n free block ids, scattered over the pool (stride apart, descending)."""
        with self.lock:
            ids = sorted(self.free, reverse=True)[::stride][:n]
            self.free -= set(ids)
        return ids

    def give(self, ids: list[int]) -> None:
        with self.lock:
            assert not self.free & set(ids), "block released twice"
            self.free |= set(ids)

    def pool_full(self) -> bool:
        return len(self.free) == NUM_BLOCKS

    def blocks(self, ids: list[int]) -> torch.Tensor:
        return self.cache[:, :, ids].cpu()

    def stats(self) -> dict:
        return self.end.stats.snapshot()

    def stacks(self) -> str:
        """Every thread's stack in this process (for a failure message: where a transfer thread is stuck)."""
        import traceback

        names = {t.ident: t.name for t in threading.enumerate()}
        return "\n".join(f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
                         for ident, frame in sys._current_frames().items())

    def call(self, method: str, *args):
        return getattr(self.end, method)(*args)

    def send(self, tid: int, dest: Destination, ids: list[int], layers: int | None):
        """Start a transfer and save `layers` layers one by one (None: all at once, a whole send)."""
        self.end.start_send(tid, dest, ids)
        if layers is None:
            self.end.save_kv(tid)
        for layer in range(layers or 0):
            self.end.save_kv_layer(tid, layer)

    def wait_state(self, tid: int, state: TransferState, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.end.state(tid) is not state and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.end.state(tid) is state


@pytest.fixture(scope="module")
def ranks():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=4, include_dashboard=False)
    actor = ray.remote(num_cpus=0)(KVRank)
    yield [actor.remote() for _ in range(4)], actor
    ray.shutdown()


def gang(actors, role, tp_size, **kwargs):
    endpoints = ray.get([a.setup.remote(role, tp_size, r, **kwargs) for r, a in enumerate(actors)])
    return Destination(tuple(endpoints))


def transfer(senders, receivers, dest, tid, n, layers):
    """Reserve n blocks on every rank, move them, return (src ids, dst ids, receiver results)."""
    src_ids = ray.get([s.take.remote(n, 3) for s in senders])
    assert all(ids == src_ids[0] for ids in src_ids)  # a TP gang shares its block table
    dst_ids = ray.get([r.take.remote(n, 2) for r in receivers])
    ray.get([r.call.remote("expect", tid, ids) for r, ids in zip(receivers, dst_ids)])
    ray.get([s.send.remote(tid, dest, src_ids[0], layers) for s in senders])
    results = ray.get([r.call.remote("wait", tid, 20) for r in receivers])
    return src_ids[0], dst_ids, results


def check_landed(receivers, dst_tp, src_ids, dst_ids):
    expected = global_cache(seed=0)[:, :, src_ids]
    for r, (rank, ids) in enumerate(zip(receivers, dst_ids)):
        hs, he = KVLayout("tiny", "bfloat16", 1, 1, 1, NUM_HEADS, dst_tp, r).heads
        assert torch.equal(ray.get(rank.blocks.remote(ids)), expected[:, :, :, hs:he])
        ray.get(rank.give.remote(ids))  # the sequence finishes: its blocks go back


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
@pytest.mark.parametrize("src_tp,dst_tp", [(1, 1), (1, 2), (2, 1)], ids=lambda tp: str(tp))
def test_destination_blocks_equal_source_blocks(ranks, transport, src_tp, dst_tp):
    actors, _ = ranks
    senders, receivers = actors[:src_tp], actors[2:2 + dst_tp]
    dest = gang(receivers, "receiver", dst_tp, transport=transport)
    gang(senders, "sender", src_tp)
    for tid, n, layers in [(1, 10, None), (2, 10, NUM_LAYERS), (3, 1, NUM_LAYERS), (4, 7, None)]:
        src_ids, dst_ids, results = transfer(senders, receivers, dest, tid, n, layers)
        assert [r.state for r in results] == [TransferState.DONE] * dst_tp, results
        check_landed(receivers, dst_tp, src_ids, dst_ids)
    send_results = ray.get([s.call.remote("wait_for_save", 4, 5) for s in senders])
    assert all(r.state is TransferState.DONE for r in send_results)
    assert all(ray.get([a.pool_full.remote() for a in senders + receivers]))


def twenty_in_order(sender, receiver, dest, earlier: tuple[int, ...] = ()) -> None:
    """Twenty transfers in flight on one pair at once (odd ids layer by layer, even ids whole): all DONE,
    finished in the order they started (after the `earlier` ones), blocks exact, both pools full again."""
    tids = list(range(100, 120))
    src_ids = [ray.get(sender.take.remote(2, 1)) for _ in tids]
    dst_ids = [ray.get(receiver.take.remote(2, 1)) for _ in tids]
    ray.get([receiver.call.remote("expect", t, ids) for t, ids in zip(tids, dst_ids)])
    ray.get([sender.send.remote(t, dest, ids, NUM_LAYERS if t % 2 else None)
             for t, ids in zip(tids, src_ids)])
    results = ray.get([receiver.call.remote("wait", t, 20) for t in tids])
    assert all(r.state is TransferState.DONE for r in results), results
    assert [r.transfer_id for r in ray.get(receiver.call.remote("get_finished"))] == [*earlier, *tids]
    for s_ids, d_ids in zip(src_ids, dst_ids):
        check_landed([receiver], 1, s_ids, [d_ids])
    assert ray.get(sender.call.remote("wait_for_save", tids[-1], 5)).state is TransferState.DONE
    assert ray.get(sender.pool_full.remote()) and ray.get(receiver.pool_full.remote())


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
def test_twenty_concurrent_transfers_on_one_pair_complete_in_order(ranks, transport):
    actors, _ = ranks
    sender, receiver = actors[0], actors[2]
    dest = gang([receiver], "receiver", 1, transport=transport)
    gang([sender], "sender", 1)
    twenty_in_order(sender, receiver, dest)


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
def test_mismatched_layout_is_refused_naming_the_field_on_both_sides(ranks, transport):
    actors, _ = ranks
    sender, receiver = actors[0], actors[2]
    dest = gang([receiver], "receiver", 1, transport=transport)
    ray.get(sender.setup.remote("sender", 1, 0, head_dim=2 * HEAD_DIM))
    _, _, results = transfer([sender], [receiver], dest, 9, 4, None)
    sent = ray.get(sender.call.remote("wait_for_save", 9, 10))
    for result in (results[0], sent):
        assert result.state is TransferState.FAILED and "'head_dim'" in result.error, result
    assert results[0].num_bytes == 0
    assert ray.get(sender.pool_full.remote()) and ray.get(receiver.pool_full.remote())


def killed_sender_fails_in_time(victim, receiver, dest, blocks_back_within_s: float = 0.0) -> None:
    """Kill the sender after layer 0 of 3 moved: the receiver's transfer fails within its deadline, and its
    blocks are back in the pool (at once, or within `blocks_back_within_s`: CUDA waits for enqueued scatters)."""
    dst_ids = ray.get(receiver.take.remote(8, 1))
    deadline_s = 4.0
    ray.get(receiver.call.remote("expect", 11, dst_ids, deadline_s))
    start = time.monotonic()
    ray.get(victim.send.remote(11, dest, ray.get(victim.take.remote(8, 1)), 1))  # only layer 0 is ready
    assert ray.get(receiver.wait_state.remote(11, TransferState.TRANSFERRING, deadline_s))
    ray.kill(victim)
    try:
        result = ray.get(receiver.call.remote("wait", 11, 2 * deadline_s))
    except ray.exceptions.RayTaskError as e:
        pytest.fail(f"{e.cause!r}; the receiver's threads:\n{ray.get(receiver.stacks.remote(), timeout=10)}")
    assert result.state is TransferState.FAILED, result
    assert time.monotonic() - start < deadline_s + 1.0
    until = time.monotonic() + blocks_back_within_s
    while not ray.get(receiver.pool_full.remote()) and time.monotonic() < until:
        time.sleep(0.05)
    assert ray.get(receiver.pool_full.remote())


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
def test_killed_sender_fails_the_receivers_transfer_within_its_deadline(ranks, transport):
    actors, actor = ranks
    receiver, victim = actors[2], actor.remote()
    dest = gang([receiver], "receiver", 1, transport=transport)
    ray.get(victim.setup.remote("sender", 1, 0))
    killed_sender_fails_in_time(victim, receiver, dest)


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda t: t.value)
def test_next_transfer_succeeds_after_the_pair_was_torn_down(ranks, transport):
    actors, _ = ranks
    sender, receiver = actors[0], actors[2]
    config = TransferConfig(timeout_s=20, idle_timeout_s=0.5, staging_bytes=2048)
    dest = gang([receiver], "receiver", 1, transport=transport, config=config)
    gang([sender], "sender", 1, config=config)
    # A transfer whose prefill stalls after layer 0: the receiver's deadline fails it and tears the pair down.
    dst_ids = ray.get(receiver.take.remote(4, 1))
    ray.get(receiver.call.remote("expect", 21, dst_ids, 1.0))
    ray.get(sender.call.remote("start_send", 21, dest, ray.get(sender.take.remote(4, 1)), 1.5))
    ray.get(sender.call.remote("save_kv_layer", 21, 0))
    assert ray.get(receiver.call.remote("wait", 21, 5)).state is TransferState.FAILED
    assert ray.get(sender.call.remote("wait_for_save", 21, 5)).state is TransferState.FAILED
    for tid in (22, 23):  # 22 on a rebuilt pair; 23 after the idle timeout closed that one too
        src_ids, dst_ids, results = transfer([sender], [receiver], dest, tid, 5, NUM_LAYERS)
        assert results[0].state is TransferState.DONE, results
        check_landed([receiver], 1, src_ids, dst_ids)
        time.sleep(1.0)
    stats = ray.get(sender.stats.remote())
    assert stats["groups_created"] == 3 and stats["groups_torn_down"] >= 2, stats
    assert ray.get(sender.pool_full.remote()) and ray.get(receiver.pool_full.remote())
