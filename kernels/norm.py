"""RMSNorm and fused residual-add + RMSNorm, numerically as Hugging Face Llama computes them."""
import torch
import triton
import triton.language as tl


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)) over the last dim; the statistics in fp32, then cast back as HF does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); the add happens in the input dtype, as in HF."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, stride_x, stride_r, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per row; y and new_res are contiguous [M, N]. Rounding points follow the HF reference.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = (x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (w * h.to(dtype).to(tl.float32)).to(dtype), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    # Any leading dims (e.g. [T, H, D] for per-head QK-norm) are rows; a non-viewable x is copied by reshape.
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    assert rows.stride(-1) == 1, "x: last dim innermost"
    assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == x.dtype, "weight: [N], x.dtype"
    assert weight.device == x.device, "all tensors on one device"
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = y
    res_rows = rows
    if residual is not None:
        assert residual.shape == x.shape, "residual: like x"
        assert residual.dtype == x.dtype and residual.device == x.device, "residual: x.dtype, same device"
        res_rows = residual.reshape(-1, n)
        assert res_rows.stride(-1) == 1, "residual: last dim innermost"
        new_res = torch.empty_like(y)
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, y, new_res, rows.stride(0), res_rows.stride(0), eps,
        N=n, HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=min(16, max(1, block // 512)),
    )
    return y, new_res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm (same contract as the ref): x [..., N], normalized over N."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused_add_rms_norm (same contract as the ref): one read of x and residual, two writes."""
    return _launch(x, residual, weight, eps)
