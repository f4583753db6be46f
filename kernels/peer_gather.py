"""Gather of every rank's column shard onto rank 0 through peer-mapped memory (a TP gang's LM head: only
rank 0 samples), cast to the logits' dtype on the way."""
import torch
import triton
import triton.language as tl

from pdserve.kernels.signal import spin_cas


def gather_to_first_ref(parts: list[torch.Tensor], out_cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """[N, n] per rank, in rank order -> [N, out_cols] (the first out_cols of their concatenation)."""
    return torch.cat(parts, dim=1)[:, :out_cols].to(out_dtype)


@triton.jit
def _gather_to_first_kernel(
    x_ptr, out_ptr, buf_ptrs, pad_ptrs, num_rows, n, stride_x, out_cols, chunks, done,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    # Work units are (row, column chunk), program p taking units p, p + P, ... on every rank. A rank > 0
    # takes rank 0's "done" token for program p (rank 0 finished reading its buffer the previous time; the
    # tokens start out given), copies its units into its buffer and puts a "ready" token on rank 0's pad.
    # Rank 0 takes every peer's ready token for p, writes its units from x and every peer's buffer, and
    # gives the done tokens back. Pad layout: ready [P, WORLD] from 0, done [P, WORLD] from `done`.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    my_units = tl.cdiv(num_rows * chunks - pid, nprog)
    offs = tl.arange(0, BLOCK)
    dtype = x_ptr.dtype.element_ty
    first_pad = tl.load(pad_ptrs).to(tl.pointer_type(tl.int32))
    if RANK != 0:
        own_pad = tl.load(pad_ptrs + RANK).to(tl.pointer_type(tl.int32))
        spin_cas(own_pad + done + pid * WORLD, 1, 0, "acquire")
        tl.debug_barrier()
        mine = tl.load(buf_ptrs + RANK).to(tl.pointer_type(dtype))
        for i in range(my_units):
            unit = pid.to(tl.int64) + i * nprog
            row, cols = unit // chunks, (unit % chunks) * BLOCK + offs
            vals = tl.load(x_ptr + row * stride_x + cols, mask=cols < n)
            tl.store(mine + row * n + cols, vals, mask=cols < n)
        tl.debug_barrier()
        spin_cas(first_pad + pid * WORLD + RANK, 0, 1, "release")
    else:
        for peer in tl.static_range(1, WORLD):
            spin_cas(first_pad + pid * WORLD + peer, 1, 0, "acquire")
        tl.debug_barrier()
        for i in range(my_units):
            unit = pid.to(tl.int64) + i * nprog
            row, cols = unit // chunks, (unit % chunks) * BLOCK + offs
            ok = (cols < n) & (cols < out_cols)
            vals = tl.load(x_ptr + row * stride_x + cols, mask=ok)
            tl.store(out_ptr + row * out_cols + cols, vals.to(out_ptr.dtype.element_ty), mask=ok)
            for r in tl.static_range(1, WORLD):
                src = tl.load(buf_ptrs + r).to(tl.pointer_type(dtype))
                ok = (cols < n) & (r * n + cols < out_cols)
                vals = tl.load(src + row * n + cols, mask=ok, cache_modifier=".cv")
                tl.store(out_ptr + row * out_cols + r * n + cols, vals.to(out_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()  # every read of the peers' buffers is done before they may be rewritten
        for peer in tl.static_range(1, WORLD):
            peer_pad = tl.load(pad_ptrs + peer).to(tl.pointer_type(tl.int32))
            spin_cas(peer_pad + done + pid * WORLD, 0, 1, "release")


def gather_to_first_triton(
    x: torch.Tensor, out_cols: int, out_dtype: torch.dtype, *, buffer_ptrs: torch.Tensor, pad_ptrs: torch.Tensor,
    rank: int, num_programs: int, block: int = 4096,
) -> torch.Tensor | None:
    """Rank 0: [N, out_cols] in out_dtype, the first out_cols columns of every rank's x side by side (rank
    order); other ranks: None (they only hand their x over).

    `buffer_ptrs` / `pad_ptrs`: int64 [world], every rank's buffer (room for x) and signal pad, in rank
    order; each pad holds 2 * num_programs * world int32 flags, the "done" half set to 1 on ranks > 0
    before the first call. Every rank makes the same calls with the same shapes and num_programs.
    """
    assert x.dim() == 2 and x.stride(-1) == 1, "x: [N, n], last dim innermost"
    world = buffer_ptrs.numel()
    assert pad_ptrs.numel() == world and 0 <= rank < world, "one buffer and one pad per rank"
    rows, n = x.shape
    assert 0 < out_cols <= world * n, "out_cols: at most every rank's columns"
    chunks = triton.cdiv(n, block)
    out = torch.empty(rows, out_cols, dtype=out_dtype, device=x.device) if rank == 0 else x
    programs = max(1, min(num_programs, rows * chunks))
    _gather_to_first_kernel[(programs,)](
        x, out, buffer_ptrs, pad_ptrs, rows, n, x.stride(0), out_cols, chunks, num_programs * world,
        RANK=rank, WORLD=world, BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return out if rank == 0 else None
