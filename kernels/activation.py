"""SiLU-and-mul: the gated MLP activation, silu(gate) * up."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] with gate in the first half and up in the second; returns silu(gate) * up, [T, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


SILU_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, stride_x, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    dtype = y_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # silu rounds to x.dtype before the product, as in HF
    tl.store(y_ptr + row * INTER + offs, (act.to(tl.float32) * up).to(dtype), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton silu_and_mul (same contract as the ref); returns a contiguous [T, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0, "x: [T, 2I]"
    assert x.stride(-1) == 1, "x: last dim innermost"
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    y = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, SILU_BLOCK))](
        x, y, x.stride(0), INTER=inter, BLOCK=SILU_BLOCK, num_warps=4
    )
    return y
