"""SiLU-and-mul: reference against the HF MLP activation."""
import pytest
import torch
from pdserve.kernels.activation import silu_and_mul_ref
from transformers.activations import ACT2FN


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_matches_hf(dtype):
    gate, up = torch.randn(5, 64, dtype=dtype), torch.randn(5, 64, dtype=dtype)
    y = silu_and_mul_ref(torch.cat([gate, up], -1))
    assert torch.equal(y, ACT2FN["silu"](gate) * up)
