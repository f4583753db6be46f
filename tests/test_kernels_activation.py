"""SiLU-and-mul: reference against the HF MLP activation, Triton against the reference."""

import os

import torch

if not torch.cuda.is_available():
    # On CPU, Triton runs only in its interpreter, which triton picks when it is first imported: set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import triton.language as tl
from transformers.activations import ACT2FN
from triton.runtime.jit import JITFunction

from pdserve.kernels import activation

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# If something imported triton before this file (in a whole-suite run), the interpreter is off: skip, say why.
runs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and isinstance(tl.max, JITFunction),
    reason="triton was imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py",
)
on_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")


@pytest.fixture
def poisoned(monkeypatch):
    """Make every float torch.empty NaN-filled, so an output element the kernel never writes fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(
        torch, "empty_like", lambda x, **kw: nan_empty(x.shape, dtype=x.dtype, device=x.device)
    )


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
