"""KV transfer between two GPUs (one Ray actor each): NCCL pairs and gRPC with CUDA caches; exact blocks, order,
and a dead sender failing the receiver's transfer within its deadline (NCCL receives aborted, not hung)."""
from __future__ import annotations

import sys
import time

import pytest
import torch

import test_kv_transfer_ray as cpu
from pdserve.kv_transfer import TransferState, TransportKind

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]


@pytest.fixture(scope="module")
def gpu_actor():
    import ray

    from pdserve.cluster.tp_gang import NCCL_ENV

    ray.cloudpickle.register_pickle_by_value(sys.modules[cpu.__name__])  # workers cannot import tests/
    ray.init(num_gpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": NCCL_ENV})
    yield ray.remote(num_gpus=1, num_cpus=0)(cpu.KVRank)
    ray.shutdown()


def pair(gpu_actor, transport, **kwargs):
    """(sender, receiver, destination): one actor per GPU, caches on the GPUs."""
    import ray

    sender, receiver = gpu_actor.remote(), gpu_actor.remote()
    dest = cpu.gang([receiver], "receiver", 1, transport=transport, device="cuda", **kwargs)
    ray.get(sender.setup.remote("sender", 1, 0, device="cuda", **kwargs))
    return sender, receiver, dest


@pytest.mark.parametrize("transport", cpu.TRANSPORTS, ids=lambda t: t.value)
def test_gpu_blocks_land_exactly_and_in_order(gpu_actor, transport):
    import ray

    sender, receiver, dest = pair(gpu_actor, transport)
    try:
        for tid, n, layers in [(1, 10, None), (2, 10, cpu.NUM_LAYERS), (3, 1, cpu.NUM_LAYERS), (4, 7, None)]:
            src_ids, dst_ids, results = cpu.transfer([sender], [receiver], dest, tid, n, layers)
            assert results[0].state is TransferState.DONE, results
            cpu.check_landed([receiver], 1, src_ids, dst_ids)
        tids = list(range(100, 120))  # twenty in flight on the pair at once, whole and layer by layer
        src_ids = [ray.get(sender.take.remote(2, 1)) for _ in tids]
        dst_ids = [ray.get(receiver.take.remote(2, 1)) for _ in tids]
        ray.get([receiver.call.remote("expect", t, ids) for t, ids in zip(tids, dst_ids)])
        ray.get([sender.send.remote(t, dest, ids, cpu.NUM_LAYERS if t % 2 else None)
                 for t, ids in zip(tids, src_ids)])
        results = ray.get([receiver.call.remote("wait", t, 20) for t in tids])
        assert all(r.state is TransferState.DONE for r in results), results
        finished = [r.transfer_id for r in ray.get(receiver.call.remote("get_finished"))]
        assert finished == [1, 2, 3, 4, *tids]
        for s_ids, d_ids in zip(src_ids, dst_ids):
            cpu.check_landed([receiver], 1, s_ids, [d_ids])
        assert ray.get(sender.call.remote("wait_for_save", tids[-1], 5)).state is TransferState.DONE
        assert ray.get(sender.pool_full.remote()) and ray.get(receiver.pool_full.remote())
    finally:
        ray.kill(sender)
        ray.kill(receiver)


def test_gpu_killed_sender_fails_the_nccl_transfer_within_its_deadline(gpu_actor):
    import ray

    victim, receiver, dest = pair(gpu_actor, TransportKind.TORCH)
    try:
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
        # the receives still posted for the dead sender were aborted: the blocks come back once scatters ran
        deadline = time.monotonic() + 2.0
        while not ray.get(receiver.pool_full.remote()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ray.get(receiver.pool_full.remote())
    finally:
        ray.kill(receiver)
