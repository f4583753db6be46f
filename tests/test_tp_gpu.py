"""TP=2 on two GPUs (small collectives over peer memory, the rest over NCCL) gives the fp32 greedy tokens
of TP=1, and fails in time when a rank dies; the peer-memory kernels against their references."""
from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from pdserve.config import load_config
from pdserve.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
# A fixed cache: sized from free memory, the TP=1 engine (still alive on GPU 0) would leave rank 0 none.
GPU = {"device": "cuda", "num_kv_blocks": 256}


def test_tp2_nccl_equals_tp1_and_survives_a_killed_rank(tiny_checkpoints):
    import ray

    from pdserve.cluster.tp_gang import NCCL_ENV, TPGang
    from test_tp_gang import killed_rank_fails_in_time

    path = tiny_checkpoints["llama-gqa-untied"]
    prompts = [[5, 9, 33, 7, 100, 3], [11, 12, 13], list(range(3, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = make_engine(path, **GPU).generate(prompts, params)
    ray.init(num_gpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": NCCL_ENV})
    try:
        gang = TPGang(load_config(None, model=path, dtype="float32", rank_timeout_s=20, **GPU), 2)
        try:
            assert gang.symmetric_all_reduce  # the decode steps' all-reduces took the peer-memory path
            assert gang.generate(prompts, params) == expected
            free, total = gang.free_blocks()
            assert free == total
            # A rank killed between steps: rank 0's next step spins on the GPU for a peer that never comes
            # (a peer-memory flag, or NCCL): the gang still fails the call in time, and rebuilds.
            for p in prompts:
                gang.add_request(p, params)
            gang.step()
            killed_rank_fails_in_time(gang, 20)
            gang.restart()
            assert gang.generate(prompts, params) == expected
        except BaseException:
            gang.shutdown()
            raise
        # every rank left the NCCL group together (its teardown is collective): nothing had to be killed
        assert gang.shutdown() is True
    finally:
        ray.shutdown()


def test_tp2_gang_whose_gemms_push_their_rows(tiny_checkpoints):
    """A bf16 TP=2 gang with `push_gemm` (its start-up self-check passed: the symmetric path is on) decodes
    every request to its length and gives every block back, and gives the same tokens again: across
    hundreds of graph replays each call awaits its own epoch. (That the pushed rows sum exactly as the
    unpushed ones is the kernel-level test below; the tokens are not compared with a gang without it,
    whose cuBLAS GEMMs round differently.)"""
    import ray

    from pdserve.cluster.tp_gang import NCCL_ENV, TPGang

    path = tiny_checkpoints["llama-gqa-untied"]
    prompts = [[5, 9, 33, 7, 100, 3], [11, 12, 13], list(range(3, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ray.init(num_gpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": NCCL_ENV})
    try:
        gang = TPGang(load_config(None, model=path, dtype="bfloat16", rank_timeout_s=20, push_gemm=True, **GPU), 2)
        try:
            assert gang.symmetric_all_reduce
            first = gang.generate(prompts, params)
            assert [len(t) for t in first] == [16] * len(prompts)
            assert gang.generate(prompts, params) == first
            free, total = gang.free_blocks()
            assert free == total
        finally:
            gang.shutdown()
    finally:
        ray.shutdown()


def _fused_rank(rank: int, port: int) -> None:
    """One rank: the fused all-reduce + add + RMSNorm against the reference, eager and replayed from a
    CUDA graph, with the same bits on both ranks; then the gather of the LM head's shards onto rank 0."""
    import os

    import torch.distributed as dist

    from pdserve.cluster.tp_gang import NCCL_ENV
    from pdserve.engine.parallel import SymmetricAllReduce
    from pdserve.kernels import norm
    from pdserve.kernels.peer_gather import gather_to_first_ref

    os.environ.update(NCCL_ENV)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=device)
    sym = SymmetricAllReduce(dist.group.WORLD, device)
    for rows, n, dtype in [(1, 4096, torch.bfloat16), (64, 4096, torch.bfloat16), (300, 2048, torch.bfloat16),
                           (7, 96, torch.float16)]:
        def make(seed, *shape, dtype=dtype):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

        calls = [([make(10 * k + r, rows, n) for r in range(2)], make(10 * k + 5, rows, n), make(10 * k + 6, n))
                 for k in range(6)]
        eager = [sym.add_rms_norm(parts[rank], res, w, 1e-5, k % 2) for k, (parts, res, w) in enumerate(calls)]
        for (parts, res, w), (y, new_res) in zip(calls, eager):
            want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-5)
            assert torch.equal(new_res, want_res), (rows, n, dtype)
            tol = 1.6e-2 if dtype == torch.bfloat16 else 2e-3
            torch.testing.assert_close(y, want_y, atol=tol, rtol=tol)
            both = torch.empty(2, *y.shape, dtype=dtype, device=device)
            dist.all_gather_into_tensor(both, y)
            assert torch.equal(both[0], both[1]), "the ranks disagree"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = [sym.add_rms_norm(parts[rank], res, w, 1e-5, k % 2) for k, (parts, res, w) in enumerate(calls)]
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for (y, new_res), (y0, res0) in zip(replayed, eager):
                assert torch.equal(y, y0) and torch.equal(new_res, res0)
    # row-parallel GEMMs that push their rows, between calls that do not (the slots alternate across both)
    from pdserve.kernels import gemm

    for rows, k, ll in [(1, 512, True), (64, 2048, True), (64, 2048, False)]:
        sym.push_ll = ll
        def make(seed, *shape):
            gen = torch.Generator(device="cuda").manual_seed(seed)
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

        n = 4096
        calls = [([make(50 + 10 * c + r, rows, k) for r in range(2)],
                  [make(55 + 10 * c + r, n, k) / k**0.5 for r in range(2)], make(58 + 10 * c, rows, n),
                  make(59 + 10 * c, n)) for c in range(4)]
        config = gemm.push_config(calls[0][0][0], calls[0][1][0])

        def run_calls(calls, config):
            out = []
            for c, (xs, ws, res, w) in enumerate(calls):
                if c % 2:
                    partial = gemm.skinny_linear_triton(xs[rank], ws[rank], config)
                    out.append(sym.add_rms_norm(partial, res, w, 1e-5, c % 2))
                else:
                    sym.push_gemm = True
                    assert sym.push_config(xs[rank], ws[rank], res) == config
                    out.append(sym.linear_add_rms_norm(xs[rank], ws[rank], res, w, 1e-5, c % 2, config))
            return out

        eager = run_calls(calls, config)
        for (xs, ws, res, w), (y, new_res) in zip(calls, eager):
            parts = [gemm.skinny_linear_triton(xs[r], ws[r], config) for r in range(2)]  # the pushing kernel's bits
            want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-5)
            assert torch.equal(new_res, want_res), rows
            torch.testing.assert_close(y, want_y, atol=1.6e-2, rtol=1.6e-2)
            both = torch.empty(2, *y.shape, dtype=y.dtype, device=device)
            dist.all_gather_into_tensor(both, y)
            assert torch.equal(both[0], both[1]), "the ranks disagree"
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = run_calls(calls, config)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for (y, new_res), (y0, res0) in zip(replayed, eager):
                assert torch.equal(y, y0) and torch.equal(new_res, res0)
    # the LM head's gather onto rank 0: bf16 shards, fp32 out, the vocabulary's padding cut off
    for rows, n in [(1, 1000), (64, 3000), (300, 4096)]:
        shards = [torch.randn(rows, n, generator=torch.Generator(device="cuda").manual_seed(100 + r), device="cuda",
                              dtype=torch.bfloat16) for r in range(2)]
        want = gather_to_first_ref(shards, 2 * n - 7, torch.float32)
        eager = [sym.gather_to_first(shards[rank], 2 * n - 7, torch.float32) for _ in range(3)]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = [sym.gather_to_first(shards[rank], 2 * n - 7, torch.float32) for _ in range(3)]
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            for got in eager + replayed:
                assert (got is None) if rank else torch.equal(got, want)
    dist.destroy_process_group()


def test_fused_all_reduce_norm_and_gather_two_gpus():
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_fused_rank, args=(port,), nprocs=2, join=False)
    deadline = time.monotonic() + 180  # a missed flag would spin forever: bounded here
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the fused all-reduce did not finish in 180 s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
