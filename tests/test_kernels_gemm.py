"""The skinny decode GEMM against torch, on odd shapes, split and unsplit; and fused with SiLU-and-mul."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import gemm, ops
from pdserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton

# Triton's interpreter multiplies bf16 tiles wrongly in tl.dot (fp16 is right): bf16 runs on GPUs only.
DTYPES = [torch.float16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]


def _inputs(m, n, k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    return x, w


@runs_triton
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("split", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [0, 10])
def test_skinny_matches_torch(m, split, dtype, cols):
    n, k = 40, 72  # neither a multiple of the blocks below
    x, w = _inputs(m, n, k, dtype, DEVICE)
    # cols 10: four programs of 10 columns in tiles of 16 (a grid sized by the columns, not the tile)
    config = gemm.SkinnyConfig(block_n=16, block_k=16, split=split, num_warps=1, num_stages=2, cols=cols)
    y = gemm.skinny_linear_triton(x, w, config)
    want = (x.float() @ w.float().T).to(dtype)  # fp32 accumulation, rounded once
    assert y.shape == (m, n) and y.dtype == dtype
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    again = gemm.skinny_linear_triton(x, w, config)
    assert torch.equal(again, y)  # the partials summed in split order: the same bits every call
    for _, count in gemm._WORKSPACE.buffers.values():
        assert not count.any()  # every tile's arrival counter back to 0 for the next call (or graph replay)


@runs_triton
def test_skinny_takes_strided_rows():
    x_wide = _inputs(4, 24, 64, torch.float16, DEVICE, seed=1)[0]
    w = _inputs(4, 24, 32, torch.float16, DEVICE)[1]
    x = x_wide[:, :32]  # rows of a wider tensor
    y = gemm.skinny_linear_triton(x, w, gemm.SkinnyConfig(16, 16, 2, num_warps=1, num_stages=2))
    torch.testing.assert_close(y, (x.float() @ w.float().T).half(), atol=2e-2, rtol=2e-2)


def test_linear_is_torch_where_no_config_applies():
    x, w = _inputs(3, 8, 16, torch.float32, "cpu")
    assert gemm.skinny_config(x, w) is None  # CPU, fp32: cuBLAS / torch
    assert torch.equal(gemm.linear(x, w), torch.nn.functional.linear(x, w))


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("n,k", [(3072, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_skinny_gpu_shapes(n, k, m):
    x, w = _inputs(m, n, k, torch.bfloat16, DEVICE)
    want = torch.nn.functional.linear(x.float(), w.float())
    for split in (1, 2, 4):
        y = gemm.skinny_linear_triton(x, w, gemm.SkinnyConfig(32, 128, split))
        torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("split", [1, 4])
def test_pdl_launch_waits_for_the_kernel_before(split):
    """Launched as a programmatic dependent launch (Hopper), replayed from a CUDA graph: each call reads the
    x that the kernel right before it wrote, and its output is not overwritten by the one after."""
    if not gemm.pdl_supported(torch.device(DEVICE)):
        pytest.skip("programmatic dependent launch needs sm90 or later")
    config = gemm.SkinnyConfig(32, 128, split)
    w = _inputs(1, 3072, 4096, torch.bfloat16, DEVICE)[1]
    sources = [_inputs(64, 1, 4096, torch.bfloat16, DEVICE, seed=s)[0] for s in range(4)]
    x = torch.empty_like(sources[0])
    outs = [None] * len(sources)
    graph = torch.cuda.CUDAGraph()
    gemm.skinny_linear_triton(x, w, config, pdl=True)  # compile outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for i, src in enumerate(sources):
            x.copy_(src * 2)  # written by the kernel right before the GEMM
            outs[i] = gemm.skinny_linear_triton(x, w, config, pdl=True)
    for _ in range(3):
        x.zero_()
        graph.replay()
        torch.cuda.synchronize()
        for src, y in zip(sources, outs):
            want = gemm.skinny_linear_triton(src * 2, w, config, pdl=False)
            assert torch.equal(y, want)  # the same kernel and split order: the same bits


@runs_triton
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("cols", [0, 24])
def test_gated_skinny_is_the_gemm_then_silu_and_mul(m, cols):
    inter, k = 40, 72  # neither a multiple of the blocks below
    dtype = DTYPES[0]
    x, w = _inputs(m, 2 * inter, k, dtype, DEVICE)
    # 16 + 16 weight rows a tile; cols 24: 12 gate and 12 up columns a program
    config = gemm.SkinnyConfig(block_n=32, block_k=16, split=1, num_warps=1, num_stages=2, cols=cols)
    y = gemm.skinny_linear_silu_and_mul_triton(x, w, config)
    gate_up = (x.float() @ w.float().T).to(dtype)  # fp32 accumulation, rounded once
    want = silu_and_mul_ref(gate_up)
    assert y.shape == (m, inter) and y.dtype == dtype
    torch.testing.assert_close(y, want, atol=2e-2, rtol=2e-2)
    if DEVICE == "cuda":  # the unfused path's bits: the same GEMM tile sums, the same roundings
        unfused = silu_and_mul_triton(gemm.skinny_linear_triton(x, w, gemm.SkinnyConfig(16, 16, 1, 1, 2)))
        assert torch.equal(y, unfused)
    with pytest.raises(AssertionError, match="gated: no split K"):
        gemm.skinny_linear_silu_and_mul_triton(x, w, dataclasses.replace(config, split=2))


def test_linear_silu_and_mul_is_the_two_calls_where_no_config_applies():
    x, w = torch.randn(3, 8), torch.randn(12, 8)
    assert gemm.gated_config(x, w) is None
    assert torch.equal(ops.linear_silu_and_mul(x, w), silu_and_mul_ref(F.linear(x, w)))
