"""KV transfer between two GPUs (one Ray actor each): NCCL pairs and gRPC with CUDA caches; exact blocks, order,
and a dead sender failing the receiver's transfer within its deadline (NCCL receives aborted, not hung)."""
from __future__ import annotations

import dataclasses
import sys

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
        cpu.twenty_in_order(sender, receiver, dest, earlier=(1, 2, 3, 4))
    finally:
        ray.kill(sender)
        ray.kill(receiver)


def test_gpu_nccl_transfers_launched_from_cuda_graphs(gpu_actor):
    """TransferConfig.cuda_graphs: whole sends go out from one graph per plan (captured once, replayed after),
    every receive comes in through one; blocks exact and in order all the same."""
    import ray

    # kv_first_poll_s: the pair thread waits (up to 1 s) for every layer to be saved before it decides, so
    # that all six go through graphs however the actors' threads are scheduled
    config = dataclasses.replace(cpu.CONFIG, cuda_graphs=True, kv_first_poll_s=1.0)
    sender, receiver, dest = pair(gpu_actor, TransportKind.TORCH, config=config)
    try:
        plan = [(1, 10, None), (2, 10, cpu.NUM_LAYERS), (3, 1, cpu.NUM_LAYERS), (4, 7, None), (5, 10, None),
                (6, 7, None)]
        for tid, n, layers in plan:
            src_ids, dst_ids, results = cpu.transfer([sender], [receiver], dest, tid, n, layers)
            assert results[0].state is TransferState.DONE, results
            cpu.check_landed([receiver], 1, src_ids, dst_ids)
        sent, received = ray.get([sender.stats.remote(), receiver.stats.remote()])
        # every transfer leaves and arrives through a graph of its plan: 10, 1 and 7 blocks, each captured once
        assert (sent["graph_transfers"], sent["graphs_captured"]) == (6, 3), sent
        assert (received["graph_transfers"], received["graphs_captured"]) == (6, 3), received
        cpu.twenty_in_order(sender, receiver, dest, earlier=tuple(t for t, _, _ in plan))
    finally:
        ray.kill(sender)
        ray.kill(receiver)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_gpu_killed_sender_fails_the_nccl_transfer_within_its_deadline(gpu_actor, graphs):
    import ray

    config = dataclasses.replace(cpu.CONFIG, cuda_graphs=graphs)
    victim, receiver, dest = pair(gpu_actor, TransportKind.TORCH, config=config)
    try:
        # the receives still posted for the dead sender are aborted; the blocks come back once scatters ran
        cpu.killed_sender_fails_in_time(victim, receiver, dest, blocks_back_within_s=2.0)
    finally:
        ray.kill(receiver)
