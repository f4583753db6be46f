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
