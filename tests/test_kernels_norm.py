"""RMSNorm and fused add + RMSNorm: references against Hugging Face Llama, Triton against the references."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_refs_match_hf(dtype):
    hf = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    hf.weight.data = torch.randn(48, dtype=dtype)
    x, res = torch.randn(7, 48, dtype=dtype), torch.randn(7, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(norm.rms_norm_ref(x, hf.weight, 1e-6), hf(x))
        y, new_res = norm.fused_add_rms_norm_ref(x, res, hf.weight, 1e-6)
        assert torch.equal(new_res, x + res)
        assert torch.equal(y, hf(x + res))


def check(shape, dtype, device):
    """Triton against the ref; a strided x (a slice of a wider tensor) and a 3-d x (per-head QK-norm)."""
    n = shape[-1]
    x = torch.randn(*shape[:-1], 2 * n, dtype=dtype, device=device)[..., :n]
    res = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device)
    # One ulp of the output dtype: the row sum's order differs from torch's.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    close = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(norm.rms_norm_triton(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), **close)
    y, new_res = norm.fused_add_rms_norm_triton(x, res, w, 1e-6)
    want_y, want_res = norm.fused_add_rms_norm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(y, want_y, **close)
    # The sum is exact on GPU; the interpreter truncates fp32 -> bf16 instead of rounding to nearest.
    res_tol = 2**-7 if device == "cpu" and dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(new_res, want_res, atol=res_tol, rtol=res_tol)


@runs_triton
@pytest.mark.parametrize("shape", [(5, 48), (3, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton(shape, dtype, poisoned):
    check(shape, dtype, DEVICE)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (333, 8192), (1024, 32, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(shape, dtype, poisoned):
    check(shape, dtype, DEVICE)


def test_ops_uses_the_reference_on_cpu():
    from pdserve.kernels import ops

    x, w = torch.randn(3, 16), torch.randn(16)
    assert ops.rms_norm.__doc__ == norm.rms_norm_ref.__doc__
    assert torch.equal(ops.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6))


def test_all_reduce_ref_is_the_sum_then_the_fused_norm():
    parts = [torch.randn(3, 16, dtype=torch.bfloat16) for _ in range(2)]
    res, w = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    y, new_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-6)
    want = norm.fused_add_rms_norm_ref((parts[0].float() + parts[1].float()).bfloat16(), res, w, 1e-6)
    assert torch.equal(y, want[0]) and torch.equal(new_res, want[1])


def one_rank_of(world: int, rank: int, rows: int, n: int, programs: int, dtype, device):
    """Run the fused all-reduce kernel as rank `rank` of `world` with the other ranks already through
    their half (partials in their buffers, their flags set on this rank's pad), so it runs alone."""
    offset = 8  # elements: the call's region starts past the buffer's head
    parts = [torch.randn(rows, n, dtype=dtype, device=device) for _ in range(world)]
    x_wide = torch.randn(rows, 2 * n, dtype=dtype, device=device)
    x_wide[:, :n] = parts[rank]
    x = x_wide[:, :n]  # strided, as a slice of a wider output would be
    res = torch.randn(rows, n, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device)
    buffers = [torch.full((offset + rows * n,), float("nan"), dtype=dtype, device=device) for _ in range(world)]
    pads = [torch.zeros(programs * world, dtype=torch.int32, device=device) for _ in range(world)]
    used = min(programs, rows)
    for r in range(world):
        if r != rank:
            buffers[r][offset:] = parts[r].flatten()
            pads[rank].view(programs, world)[:used, r] = 1  # rank r's programs have arrived
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    pad_ptrs = torch.tensor([p.data_ptr() for p in pads], dtype=torch.int64, device=device)
    y, new_res = norm.all_reduce_add_rms_norm_triton(
        x, res, w, 1e-6, buffer_ptrs=ptrs, pad_ptrs=pad_ptrs, buffer_offset=offset, rank=rank, num_programs=programs)
    return parts, res, w, buffers, pads, y, new_res, offset, used


@runs_triton
@pytest.mark.parametrize("world,rank,rows,programs", [(2, 0, 5, 8), (2, 1, 6, 4), (4, 2, 3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_reduce_add_rms_norm_one_rank(world, rank, rows, programs, dtype):
    parts, res, w, buffers, pads, y, new_res, offset, used = one_rank_of(world, rank, rows, 48, programs, dtype,
                                                                        DEVICE)
    want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-6)
    # bf16 on the interpreter: its fp32 -> bf16 casts truncate where the reference rounds, twice before
    # the norm (the sum, then the residual add), which |weight| amplifies: up to a few bf16 ulps of y.
    tol = {torch.float32: 1e-5, torch.bfloat16: 4e-2 if DEVICE == "cpu" else 1.6e-2}[dtype]
    torch.testing.assert_close(y, want_y, atol=tol, rtol=tol)
    # the interpreter truncates fp32 -> bf16 where the GPU rounds: up to one bf16 ulp per rounding
    res_tol = 2**-6 if DEVICE == "cpu" and dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(new_res, want_res, atol=res_tol, rtol=res_tol)
    assert torch.equal(buffers[rank][offset:], parts[rank].flatten())  # its partial, for the peers to read
    assert torch.isnan(buffers[rank][:offset].float()).all()  # nothing before the region
    assert not pads[rank].any()  # every flag it was given taken back
    for r in range(world):
        if r != rank:  # one flag set on each peer's pad, one per program, in this rank's column
            want = torch.zeros(programs, world, dtype=torch.int32, device=DEVICE)
            want[:used, rank] = 1
            assert torch.equal(pads[r].view(programs, world), want)
