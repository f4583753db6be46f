"""SiLU-and-mul: reference against the HF MLP activation, Triton against the reference."""

import pytest
import torch
from transformers.activations import ACT2FN

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import activation


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_hf(dtype):
    gate, up = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    y = activation.silu_and_mul_ref(torch.cat([gate, up], -1))
    assert torch.equal(y, ACT2FN["silu"](gate) * up)


def check(num_tokens, inter, dtype, device):
    x = torch.randn(num_tokens, 2 * inter + 8, dtype=dtype, device=device)[:, : 2 * inter]  # strided rows
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]  # one ulp: exp differs
    torch.testing.assert_close(
        activation.silu_and_mul_triton(x), activation.silu_and_mul_ref(x), atol=tol, rtol=tol
    )


@runs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton(dtype, poisoned):
    check(3, 1100, dtype, DEVICE)  # two column tiles, the second partial


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu(dtype, poisoned):
    check(2048, 14336, dtype, DEVICE)
