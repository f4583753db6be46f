"""Gather of the ranks' column shards onto rank 0: each rank's half run alone under the interpreter,
with the other ranks' halves already done (their data and tokens in place)."""
import pytest
import torch

from kernel_support import DEVICE, runs_triton
from pdserve.kernels import peer_gather


def test_ref_concatenates_and_casts():
    parts = [torch.randn(3, 5, dtype=torch.bfloat16) for _ in range(2)]
    out = peer_gather.gather_to_first_ref(parts, 8, torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, torch.cat(parts, 1)[:, :8].float())


def setup(world: int, rows: int, n: int, programs: int, dtype):
    parts = [torch.randn(rows, n, dtype=dtype, device=DEVICE) for _ in range(world)]
    buffers = [torch.full((rows * n,), float("nan"), dtype=dtype, device=DEVICE) for _ in range(world)]
    pads = [torch.zeros(2, programs, world, dtype=torch.int32, device=DEVICE) for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=DEVICE)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=DEVICE)
    return parts, buffers, pads, ptrs, pad_ptrs


@runs_triton
@pytest.mark.parametrize("world,rows,n,out_cols,programs,block", [(2, 3, 40, 75, 4, 16), (4, 2, 24, 96, 8, 32)])
def test_rank0_gathers_every_shard(world, rows, n, out_cols, programs, block):
    parts, buffers, pads, ptrs, pad_ptrs = setup(world, rows, n, programs, torch.bfloat16)
    used = min(programs, rows * -(-n // block))
    for r in range(1, world):  # the peers have copied their shards and put their ready tokens
        buffers[r].copy_(parts[r].flatten())
        pads[0][0, :used, r] = 1
    wide = torch.randn(rows, 2 * n, dtype=torch.bfloat16, device=DEVICE)
    wide[:, :n] = parts[0]
    out = peer_gather.gather_to_first_triton(wide[:, :n], out_cols, torch.float32, buffer_ptrs=ptrs,
                                             pad_ptrs=pad_ptrs, rank=0, num_programs=programs, block=block)
    assert torch.equal(out, peer_gather.gather_to_first_ref(parts, out_cols, torch.float32))
    assert not pads[0].any()  # every ready token taken
    for r in range(1, world):  # a done token given back to each peer, one per program
        want = torch.zeros(2, programs, world, dtype=torch.int32, device=DEVICE)
        want[1, :used, 0] = 1
        assert torch.equal(pads[r], want)


@runs_triton
def test_other_rank_hands_its_shard_over():
    world, rows, n, programs = 2, 3, 40, 4
    parts, buffers, pads, ptrs, pad_ptrs = setup(world, rows, n, programs, torch.float32)
    used = min(programs, rows * 3)
    pads[1][1, :used, 0] = 1  # rank 0's done tokens from setup (no earlier call to wait for)
    got = peer_gather.gather_to_first_triton(parts[1], 70, torch.float32, buffer_ptrs=ptrs, pad_ptrs=pad_ptrs,
                                             rank=1, num_programs=programs, block=16)
    assert got is None
    assert torch.equal(buffers[1], parts[1].flatten())  # its shard, for rank 0 to read
    assert not pads[1].any()  # its done tokens taken
    want = torch.zeros(2, programs, world, dtype=torch.int32, device=DEVICE)
    want[0, :used, 1] = 1  # a ready token on rank 0's pad, one per program
    assert torch.equal(pads[0], want)
