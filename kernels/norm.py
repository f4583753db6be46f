"""RMSNorm and fused residual-add + RMSNorm, numerically as Hugging Face Llama computes them."""
import torch
import triton
import triton.language as tl

from pdserve.kernels.signal import spin_cas


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


# ---- all-reduce fused with the residual add + RMSNorm (tensor parallelism over peer memory) ---------------


def all_reduce_add_rms_norm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a row-parallel layer's all-reduce and the add + RMSNorm after it compute: the ranks' partial
    sums (in rank order) added in fp32 and rounded once, then `fused_add_rms_norm_ref`."""
    total = torch.stack([p.float() for p in partials]).sum(0).to(residual.dtype)
    return fused_add_rms_norm_ref(total, residual, weight, eps)


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, buf_ptrs, pad_ptrs, buf_offset, num_rows, stride_x, stride_r, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, N: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program p takes rows p, p + P, ... on every rank. (1) it copies this rank's partial rows into its
    # buffer; (2) it meets program p of every other rank through the signal pads: it sets flag
    # [p, RANK] on each peer's pad (0 -> 1, release) and takes flag [p, peer] on its own (1 -> 0, acquire),
    # so the flags are all 0 again when every rank is through; (3) it reads the rows from every rank's
    # buffer in rank order (the same bits on every rank), sums them in fp32, and adds + normalizes as
    # _rms_norm_kernel does. Flags are tokens, not epochs: a CUDA graph replays the kernel as it is.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    first = pid.to(tl.int64)
    my_rows = tl.cdiv(num_rows - pid, nprog)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    dtype = y_ptr.dtype.element_ty
    mine = tl.load(buf_ptrs + RANK).to(tl.pointer_type(dtype)) + buf_offset
    for i in range(my_rows):
        row = first + i * nprog
        part = tl.load(x_ptr + row * stride_x + offs, mask=mask)
        tl.store(mine + row * N + offs, part, mask=mask)
    tl.debug_barrier()  # every thread's stores happen before the release below
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            pad = tl.load(pad_ptrs + peer).to(tl.pointer_type(tl.int32))
            spin_cas(pad + pid * WORLD + RANK, 0, 1, "release")
    own_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            spin_cas(own_pad + pid * WORLD + peer, 1, 0, "acquire")
    tl.debug_barrier()  # the acquire above happens before every thread's peer loads
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    for i in range(my_rows):
        row64 = first + i * nprog
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            src = tl.load(buf_ptrs + r).to(tl.pointer_type(dtype)) + buf_offset
            total += tl.load(src + row64 * N + offs, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
        x = total.to(dtype).to(tl.float32)
        x = (x + tl.load(res_ptr + row64 * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row64 * N + offs, x, mask=mask)
        x = x.to(tl.float32)
        h = x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)
        tl.store(y_ptr + row64 * N + offs, (w * h.to(dtype).to(tl.float32)).to(dtype), mask=mask)


def all_reduce_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, buffer_ptrs: torch.Tensor,
    pad_ptrs: torch.Tensor, buffer_offset: int, rank: int, num_programs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(sum over ranks of x + residual), sum + residual) on every rank, in one launch.

    `buffer_ptrs` / `pad_ptrs`: int64 [world] on x's device, the address of every rank's buffer and signal
    pad (int32, at least `num_programs * world` flags, all 0 between calls), in rank order; this call uses
    each buffer from element `buffer_offset` on, for x's rows packed. Every rank of the group must make the
    same call (same shapes, offset and `num_programs`), and two calls in a row on one stream must not use
    the same buffer region (a peer may still be reading the previous one).
    """
    assert x.dim() == 2 and residual.shape == x.shape, "x, residual: [T, N]"
    assert x.stride(-1) == 1 and residual.stride(-1) == 1, "x, residual: last dim innermost"
    assert x.dtype == residual.dtype == weight.dtype, "x, residual, weight: one dtype"
    n = x.shape[1]
    assert weight.shape == (n,) and weight.is_contiguous(), "weight: [N]"
    world = buffer_ptrs.numel()
    assert pad_ptrs.numel() == world and 0 <= rank < world, "one buffer and one pad per rank"
    assert buffer_ptrs.dtype == pad_ptrs.dtype == torch.int64, "addresses: int64"
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(y)
    block = triton.next_power_of_2(n)
    _all_reduce_add_rms_norm_kernel[(max(1, min(num_programs, x.shape[0])),)](
        x, residual, weight, y, new_res, buffer_ptrs, pad_ptrs, buffer_offset, x.shape[0], x.stride(0),
        residual.stride(0), eps, RANK=rank, WORLD=world, N=n, BLOCK_N=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return y, new_res
