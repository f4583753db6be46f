"""Skinny GEMM for decode steps: y = x @ w.T with few rows (a batch of single tokens) and a large weight.

At decode sizes the work is reading the weight once; cuBLAS leaves some of the narrower per-rank shapes of
a tensor-parallel model well below the copy bandwidth (docs/benchmarks.md). This kernel spreads the weight
over more programs: each takes BN output columns and 1/SPLIT of K, and with SPLIT > 1 the last program to
finish a column tile sums the tile's fp32 partials in split order, so the result is deterministic. Which
shapes take it, and how, is a table measured per device kind (`SKINNY_CONFIGS`, `python tools/gemm.py`);
every other shape stays on cuBLAS.

On Hopper and later the kernel is launched as a programmatic dependent launch (PDL): its programs start
while the kernel before it in the stream finishes its last wave, and wait (`gdc_wait`) before they touch
memory, so a short GEMM's launch overlaps its predecessor instead of following it (docs/benchmarks.md).

Two epilogues ride on the same kernel: SiLU-and-mul for a merged [gate; up] weight (each program takes
matching gate and up rows and stores silu(gate) * up: `skinny_linear_silu_and_mul_triton`), and, for a
tensor-parallel gang's row-parallel projections, a push of each finished tile into the peers' fused
all-reduce buffers (`skinny_linear_push_triton`, kernels/norm.py), so the all-reduce after it only waits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.launch import pdl_kwargs, pdl_supported
from pdserve.kernels.norm import MAX_FUSED_PROGRAMS, fused_flag, fused_ll_region, fused_plain_region

MAX_ROWS = 64  # the kernel keeps all rows of a tile in one block


@dataclass(frozen=True)
class SkinnyConfig:
    block_n: int
    block_k: int
    split: int
    num_warps: int = 4
    num_stages: int = 4
    cols: int = 0  # output columns per program, at most block_n (0: block_n); sizes the grid

    def __post_init__(self):
        assert 0 <= self.cols <= self.block_n, "cols: at most block_n"

    @property
    def columns(self) -> int:
        return self.cols or self.block_n


# (device capability, N, K) -> config, for bf16/fp16 x with up to MAX_ROWS rows; measured with
# `python tools/gemm.py` (docs/benchmarks.md, "Figures behind defaults"). Shapes absent here run on cuBLAS.
SKINNY_CONFIGS: dict[tuple[tuple[int, int], int, int], SkinnyConfig] = {
    # H100/H200 (sm90), measured on an H200 with PDL launches: Llama-3-8B's qkv and o at TP=1, o at TP=2,
    # gate/up at both; cuBLAS keeps the shapes where it was as fast.
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
    buf_ptrs, epochs_ptr, slot, region_words,
    BM: tl.constexpr, BN: tl.constexpr, CN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    PUSH: tl.constexpr, LL: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    GATED: tl.constexpr,
):
    # Program pn takes output columns [pn * CN, (pn + 1) * CN) in a tile of BN >= CN (CN < BN: a grid sized
    # to the SMs where BN's power of two would not be).
    # GATED: the weight is [gate; up], 2N rows; each program takes CN columns of both and stores
    # silu(gate) * up, rounded as silu_and_mul rounds the two GEMM outputs (no split K).
    pn = tl.program_id(0)
    ps = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pn * CN + tl.arange(0, BN)
    col_ok = (tl.arange(0, BN) < CN) & (rn < N)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc_up = tl.zeros([BM, BN], dtype=tl.float32)
    k_start = ps * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before has finished: x (and y's memory) are ours
    for k0 in range(k_start, k_end, BK):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < k_end),
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=col_ok[None, :] & (k[:, None] < k_end), other=0.0)
        acc += tl.dot(a, b)
        if GATED:
            b_up = tl.load(w_ptr + (rn[None, :] + N).to(tl.int64) * stride_wn + k[:, None],
                           mask=col_ok[None, :] & (k[:, None] < k_end), other=0.0)
            acc_up += tl.dot(a, b_up)
    out_mask = (rm[:, None] < M) & col_ok[None, :]
    out = y_ptr + rm[:, None] * N + rn[None, :]
    if GATED:
        dtype = y_ptr.dtype.element_ty
        gate = acc.to(dtype).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # as kernels/activation.py
        tl.store(out, (act.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype), mask=out_mask)
    elif SPLIT == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
        if PUSH and LL:
            # the tile also goes into every peer's fused all-reduce buffer (kernels/norm.py) while the other
            # programs still stream the weight, as LL words: two 16-bit values low, the call's epoch high,
            # each word its own flag (no fence, no flag of its own; the all-reduce after this GEMM polls them)
            epoch = tl.load(epochs_ptr + slot) + 1
            lo, hi = tl.split(tl.reshape(acc.to(y_ptr.dtype.element_ty), [BM, BN // 2, 2]))
            words = (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16) | (lo.to(tl.int16, bitcast=True).to(tl.int32)
                                                                           & 0xFFFF)
            packed = (epoch.to(tl.int64) << 32) | words.to(tl.uint32, bitcast=True).to(tl.int64)
            wn = pn * (CN // 2) + tl.arange(0, BN // 2)
            wn_ok = (tl.arange(0, BN // 2) < CN // 2) & (wn < N // 2)
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    dst = tl.load(buf_ptrs + peer).to(tl.pointer_type(tl.int64))
                    dst += fused_ll_region(slot, RANK, WORLD, region_words)
                    tl.store(dst + rm[:, None] * (N // 2) + wn[None, :], packed,
                             mask=(rm[:, None] < M) & wn_ok[None, :])
        elif PUSH:
            # the tile also goes, as plain rows, into every peer's fused all-reduce buffer (kernels/norm.py)
            # while the other programs still stream the weight; then this program's flag on each peer,
            # released after its stores, which the all-reduce kernel after this GEMM awaits
            epoch = tl.load(epochs_ptr + slot) + 1
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    rows = tl.load(buf_ptrs + peer).to(tl.pointer_type(y_ptr.dtype.element_ty))
                    rows += 2 * fused_plain_region(slot, RANK, WORLD, region_words)  # 16-bit values, 2 a word
                    tl.store(rows + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.debug_barrier()  # every thread's stores happen before the releases below
            for peer in tl.static_range(WORLD):
                if peer != RANK:
                    flag = tl.load(buf_ptrs + peer).to(tl.pointer_type(tl.int32))
                    flag += fused_flag(slot, pn, RANK, WORLD, region_words, MAX_PROGRAMS)
                    tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
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


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig,
                         pdl: bool | None = None) -> torch.Tensor:
    """linear_ref's contract for x of at most MAX_ROWS rows (last dims innermost), by the skinny kernel;
    `pdl` (None: where the GPU has it) launches it as a programmatic dependent launch."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape == (N, K) and M <= MAX_ROWS, "x [M <= MAX_ROWS, K], weight [N, K]"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "x, weight: last dim innermost"
    bm = max(16, triton.next_power_of_2(M))
    tiles = triton.cdiv(N, config.columns)
    # each split takes a whole number of K blocks
    k_per_split = triton.cdiv(triton.cdiv(K, config.split), config.block_k) * config.block_k
    split = triton.cdiv(K, k_per_split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part, count = _WORKSPACE.get(x.device, split * bm * N if split > 1 else 1, tiles)
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _skinny_gemm_kernel[(tiles, split)](
        x, weight, y, part, count, M, N, K, x.stride(0), weight.stride(0), k_per_split, count, count, 0, 0,
        BM=bm, BN=config.block_n, CN=config.columns, BK=config.block_k, SPLIT=split, PDL=pdl, PUSH=False, LL=False,
        RANK=0, WORLD=1,
        MAX_PROGRAMS=MAX_FUSED_PROGRAMS, GATED=False, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl_kwargs(pdl),
    )
    return y


def skinny_linear_silu_and_mul_triton(x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig,
                                      pdl: bool | None = None) -> torch.Tensor:
    """silu_and_mul(linear_ref(x, weight)) for a merged [gate; up] weight [2I, K], in one kernel: each
    program reads config.block_n weight rows, half of them gate and half up, and stores silu(gate) * up
    ([M, I]) with the unfused path's roundings. `config` must not split K."""
    M, K = x.shape
    N = weight.shape[0] // 2
    assert weight.shape == (2 * N, K) and M <= MAX_ROWS, "x [M <= MAX_ROWS, K], weight [2I, K]"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "x, weight: last dim innermost"
    assert config.split == 1 and config.block_n % 2 == 0 and config.columns % 2 == 0, (
        "gated: no split K, block_n and cols even (block_n >= 32 on GPUs)")
    bn, cn = config.block_n // 2, config.columns // 2
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _skinny_gemm_kernel[(triton.cdiv(N, cn), 1)](
        x, weight, y, y, y, M, N, K, x.stride(0), weight.stride(0), K, y, y, 0, 0,
        BM=max(16, triton.next_power_of_2(M)), BN=bn, CN=cn, BK=config.block_k, SPLIT=1, PDL=pdl, PUSH=False,
        LL=False,
        RANK=0, WORLD=1, MAX_PROGRAMS=MAX_FUSED_PROGRAMS, GATED=True, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl_kwargs(pdl),
    )
    return y


def gated_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The config `skinny_linear_silu_and_mul_triton` runs this merged [gate; up] projection with (the
    table's, where unsplit), or None (the GEMM, then silu_and_mul)."""
    config = skinny_config(x, weight)
    ok = config is not None and config.split == 1 and config.block_n % 32 == 0 and config.columns % 2 == 0
    return config if ok else None


# A row-parallel projection whose rows the kernel pushes (`skinny_linear_push_triton`) when SKINNY_CONFIGS
# has no entry for its shape, or one that splits K (a pushed tile must be final when its program ends).
PUSH_CONFIG = SkinnyConfig(32, 128, 1, 4, 6)


def push_config(x: torch.Tensor, weight: torch.Tensor) -> SkinnyConfig | None:
    """The config `skinny_linear_push_triton` runs this call with, or None where it cannot take it (more
    than MAX_ROWS rows, 32-bit values, an odd row length, more column tiles than the flags allow)."""
    if not (x.is_cuda and x.dim() == 2 and x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1 and weight.shape[0] % 2 == 0):
        return None
    config = SKINNY_CONFIGS.get((torch.cuda.get_device_capability(x.device), *weight.shape))
    config = config if config is not None and config.split == 1 else PUSH_CONFIG
    return config if triton.cdiv(weight.shape[0], config.columns) <= MAX_FUSED_PROGRAMS else None


def skinny_linear_push_triton(
    x: torch.Tensor, weight: torch.Tensor, config: SkinnyConfig, *, buffer_ptrs: torch.Tensor, epochs: torch.Tensor,
    slot: int, region_words: int, rank: int, ll: bool = True, pdl: bool | None = None,
) -> tuple[torch.Tensor, int]:
    """(x @ weight.T, the number of programs that pushed it): linear_ref's contract, and each program also
    pushes its column tile of the result into every peer's fused all-reduce buffer (`buffer_ptrs`,
    `epochs`, `slot`, `region_words` as `norm.all_reduce_add_rms_norm_triton` takes them) and sets its
    flag there, or (`ll`) pushes it as LL words, each its own flag. The all-reduce call that follows on
    the same slot, with `pushed_tiles` = that number and the same `ll`, then only waits, sums and
    normalizes: the rows cross NVLink while the GEMM still streams its weight. `config` must not split K
    (`push_config`); with `ll` its block_n must be even."""
    M, K = x.shape
    N = weight.shape[0]
    world = buffer_ptrs.numel()
    assert weight.shape == (N, K) and M <= MAX_ROWS and N % 2 == 0, "x [M <= MAX_ROWS, K], weight [N even, K]"
    assert x.stride(-1) == 1 and weight.stride(-1) == 1, "x, weight: last dim innermost"
    assert config.split == 1, "a pushed tile must be final: no split K"
    assert not ll or config.columns % 2 == 0, "LL words hold two values: block_n and cols even"
    assert buffer_ptrs.dtype == torch.int64 and 0 <= rank < world and region_words >= M * N // 2, "rows fit a region"
    assert epochs.dtype == torch.int32 and epochs.shape == (2,) and slot in (0, 1), "a counter per slot"
    tiles = triton.cdiv(N, config.columns)
    assert tiles <= MAX_FUSED_PROGRAMS, f"at most {MAX_FUSED_PROGRAMS} column tiles (one flag each per slot)"
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    pdl = pdl_supported(x.device) if pdl is None else pdl
    _skinny_gemm_kernel[(tiles, 1)](
        x, weight, y, y, y, M, N, K, x.stride(0), weight.stride(0), K, buffer_ptrs, epochs, slot, region_words,
        BM=max(16, triton.next_power_of_2(M)), BN=config.block_n, CN=config.columns, BK=config.block_k, SPLIT=1,
        PDL=pdl, PUSH=True,
        LL=ll, RANK=rank, WORLD=world, MAX_PROGRAMS=MAX_FUSED_PROGRAMS, GATED=False, num_warps=config.num_warps,
        num_stages=config.num_stages, **pdl_kwargs(pdl),
    )
    return y, tiles


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the skinny kernel where SKINNY_CONFIGS names the shape (decode-sized x)."""
    config = skinny_config(x, weight) if bias is None else None
    if config is None:
        return F.linear(x, weight, bias)
    return skinny_linear_triton(x, weight, config)
