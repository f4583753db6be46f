"""Skinny GEMM for decode steps: y = x @ w.T with few rows (a batch of single tokens) and a large weight.

At decode sizes the work is reading the weight once; cuBLAS leaves some of the narrower per-rank shapes of
a tensor-parallel model well below the copy bandwidth (on an H200, the TP=2 Llama-3-8B qkv projection of
64 rows runs at ~2.4 TB/s). This kernel spreads the weight over more programs: each takes BN output
columns and 1/SPLIT of K, and with SPLIT > 1 the last program to finish a column tile sums the tile's
fp32 partials in split order, so the result is deterministic. Which shapes take it, and how, is a table
measured per device kind (`SKINNY_CONFIGS`, `python -m pdserve.bench.gemm`); every other shape stays on
cuBLAS.

On Hopper and later the kernel is launched as a programmatic dependent launch (PDL): its programs start
while the kernel before it in the stream finishes its last wave, and wait (`gdc_wait`) before they touch
memory, so a short GEMM's launch overlaps its predecessor instead of following it (0.2-0.8 µs a call on
an H200, docs/benchmarks.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 64  # the kernel keeps all rows of a tile in one block


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split: int
    num_warps: int = 4
    num_stages: int = 4


# (device capability, N, K) -> config, for bf16/fp16 x with up to MAX_ROWS rows; measured with
# `python -m pdserve.bench.gemm` (docs/benchmarks.md). Shapes absent here run on cuBLAS.
SKINNY_CONFIGS: dict[tuple[tuple[int, int], int, int], SkinnyConfig] = {
    # H100/H200 (sm90), measured on an H200 with PDL launches, µs cuBLAS -> skinny at 64 rows: Llama-3-8B's
    # qkv at TP=1 15.9 -> 15.4, o at TP=1 12.4 -> 11.6 and at TP=2 7.5 -> 7.0, gate/up at TP=1 63.9 -> 61.0
    # and at TP=2 33.2 -> 30.0. cuBLAS stays for qkv at TP=2 and down at both (within 3% at 64 rows, or
    # faster at 1 row).
    ((9, 0), 6144, 4096): SkinnyConfig(64, 128, 1, 4, 6),
    ((9, 0), 4096, 4096): SkinnyConfig(32, 128, 1, 4, 6),
    ((9, 0), 28672, 4096): SkinnyConfig(128, 128, 1, 4, 4),
    ((9, 0), 4096, 2048): SkinnyConfig(32, 128, 1, 4, 6),
    ((9, 0), 14336, 4096): SkinnyConfig(128, 128, 1, 4, 4),
}


def linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T -> [M, N] in x's dtype (cuBLAS on CUDA)."""
    return F.linear(x, weight)


@triton.jit
def _skinny_gemm_kernel(
    x_ptr, w_ptr, y_ptr, part_ptr, count_ptr, M, N, K, stride_xm, stride_wn, k_per_split,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = ps * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before has finished: x (and y's memory) are ours
    for k0 in range(k_start, k_end, BK):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < k_end),
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=(rn[None, :] < N) & (k[:, None] < k_end), other=0.0)
        acc += tl.dot(a, b)
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    out = y_ptr + rm[:, None] * N + rn[None, :]
    if SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        # this split's partial, then an arrival on the tile's counter; the last to arrive sums them all in
        # split order (the same bits whichever finished first) and puts the counter back to 0 for the next
        # call (a CUDA graph replays the kernel as it is)
        tile = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(tile + ps * BM * N, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is stored before the arrival below
        arrived = tl.atomic_add(count_ptr + pn, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            tl.debug_barrier()  # the arrival (acquire) happens before every thread's loads
            total = tl.zeros([BM, BN], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(tile + s * BM * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pn, 0, sem="relaxed", scope="gpu")


class _Workspace:
    """fp32 partials and per-tile counters (zero between calls), one pair per (device, sizes) and kept for
    good: a CUDA graph that captured a call keeps using their addresses."""

    def __init__(self):
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, part_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, part_elems, tiles)
        if key not in self.buffers:
            self.buffers[key] = (torch.empty(part_elems, dtype=torch.float32, device=device),
                                 torch.zeros(tiles, dtype=torch.int32, device=device))
        return self.buffers[key]


_WORKSPACE = _Workspace()


def skinny_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The measured config for this call, or None (cuBLAS)."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1):
        return None
    return SKINNY_CONFIGS.get((torch.cuda.get_device_capability(x.device), *weight.shape))


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper (sm90) and later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig,
                         pdl: bool | None = None) -> torch.Tensor:
    """linear_ref's contract for x of at most MAX_ROWS rows (last dims innermost), by the skinny kernel;
    `pdl` (None: where the GPU has it) launches it as a programmatic dependent launch."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K) and M <= MAX_ROWS, "x [M <= MAX_ROWS, K], weight [N, K]"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "x, weight: last dim innermost"
    bm = max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(N, config.block_n)
    # each split takes a whole number of K blocks
    k_per_split = triton.cdiv(triton.cdiv(K, config.split), config.block_k) * config.block_k
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part, count = _WORKSPACE.get(x.device, split * bm * N if split > 1 else 1, tiles)
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _skinny_gemm_kernel[(tiles, split)](
        x, weight, y, part, count, M, N, K, x.stride(0), weight.stride(0), k_per_split,
        BM=bm, BN=config.block_n, BK=config.block_k, SPLIT=split, PDL=pdl, num_warps=config.num_warps,
        num_stages=config.num_stages, **({"launch_pdl": True} if pdl else {}),
    )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the skinny kernel where SKINNY_CONFIGS names the shape (decode-sized x)."""
    config = skinny_config(x, weight) if bias is None else None
    if config is None:
        return F.linear(x, weight, bias)
    return skinny_linear_triton(x, weight, config)
