"""Paged decode attention: one query token per sequence against its paged K/V cache."""
import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.launch import pdl_kwargs, pdl_supported

LOG2E = math.log2(math.e)


def gather_paged_kv(
    k_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    seq_lens: torch.Tensor,  # [S] int32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each sequence's keys/values into padded fp32 [S, Hkv, L, D], L = max(seq_lens) rounded up
    to a block; positions past a sequence's length are zeroed.

    NOTE: the zeroing matters: unwritten cache slots may hold NaN/inf, and a masked-out probability of 0
    times NaN is still NaN.
    """
    block_size = k_cache.shape[2]
    num_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].long()
    s, hkv, d = table.shape[0], k_cache.shape[1], k_cache.shape[3]
    valid = torch.arange(num_blocks * block_size, device=k_cache.device)[None, :] < seq_lens[:, None]
    valid = valid[:, None, :, None]  # [S, 1, L, 1]

    def gather(cache: torch.Tensor) -> torch.Tensor:
        x = cache[table].transpose(1, 2).reshape(s, hkv, num_blocks * block_size, d).float()
        return torch.where(valid, x, 0.0)

    return gather(k_cache), gather(v_cache)


def key_mask(q_pos: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """q_pos: [S, M] query positions -> bool [S, 1, M, num_keys], True where the key is attended."""
    k_pos = torch.arange(num_keys, device=q_pos.device)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return mask[:, None]


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, includes the query token itself
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Attention of each sequence's last token (position context_lens[b]-1) over its cached keys.

    GQA: query head h reads kv head h // (Hq // Hkv). Computed in fp32; returns [B, Hq, D] in q.dtype.
    """
    k, v = gather_paged_kv(k_cache, v_cache, block_tables, context_lens)
    mask = key_mask((context_lens.long() - 1)[:, None], k.shape[2], sliding_window)
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None, :], k, v, attn_mask=mask, scale=scale, enable_gqa=True
    )  # [B, Hq, 1, D]
    return out[:, :, 0].to(q.dtype)


# ---------------------------------------------------------------- Triton (split-K / FlashDecoding)
# Program (b, kv head, split) walks one slice of sequence b's context in tiles of BLOCK_N tokens and serves
# all GROUP query heads of its kv head from each K/V tile (rows padded to BLOCK_H >= 16 for tl.dot).
# Each slice writes an fp32 partial output and its log-sum-exp; a second kernel merges the slices. With one
# split the program writes the output itself: no partials, no merge launch (B >= 64 at 8 kv heads on 132 SMs).
# NOTE: merging inside the split kernel (the last slice of each (sequence, kv head) to arrive, found by an
# atomic counter) is not done: one program would then merge serially after all others finished
# (docs/history.md, Rejected).
# NOTE: DOT_FP32 is for the CPU interpreter, which keeps bf16 as raw uint16 bits and would multiply those;
# it is False on GPU, where the dots take the cache dtype (tensor cores).

# Tile and split defaults from the H200 sweep in docs/benchmarks.md (Kernels).
DECODE_CONFIG = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
SPLIT_TARGET_WAVES = 4  # split while the grid is under ~4 programs per SM (B64 x 8 kv heads: unsplit)
MIN_SPLIT_TOKENS = 64  # one tile per slice: batch 1 at ctx 4096 ran best at 64 splits
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, part_ptr, lse_ptr, out_ptr,
    scale_log2, window, num_splits,
    stride_qb, stride_qh, stride_kn, stride_kh, stride_kt, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if PDL:
        tl.extra.cuda.gdc_wait()  # kernels/launch.py
    ctx = tl.load(lens_ptr + b)
    lo = tl.maximum(ctx - window, 0) if USE_WINDOW else 0
    # Each sequence's own range is cut into num_splits tile-aligned slices: balanced for any length.
    chunk = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h
    hd_mask = (offs_h < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=hd_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n  # [BLOCK_N]
        n_mask = pos < end
        page = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = page * stride_kn + kvh * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        nd_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_H, BLOCK_N], log2 domain
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds >= 1 valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # An empty slice (short sequence) leaves l_i = 0: it writes lse = -inf and zeros, weight 0 in the merge.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if SPLIT:
        row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split  # [BLOCK_H] into [B, Hq, S]
        tl.store(lse_ptr + row, m_i + tl.log2(l_safe), mask=offs_h < GROUP)
        tl.store(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=hd_mask)
    else:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, (acc / l_safe[:, None]).to(out_ptr.dtype.element_ty), mask=hd_mask)


@triton.jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    if PDL:
        tl.extra.cuda.gdc_wait()  # kernels/launch.py
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    row = (b * tl.num_programs(1) + h) * num_splits + offs_s  # [BLOCK_S]
    lse = tl.load(lse_ptr + row, mask=offs_s < num_splits, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # slice 0 is never empty, so the max is finite
    mask = (offs_s < num_splits)[:, None] & (offs_d < HEAD_DIM)[None, :]
    part = tl.load(part_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


@functools.cache
def _num_sms(device: torch.device) -> int:
    # The interpreter (CPU tensors) has no SMs to fill: one split unless the caller asks for more.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence so that batch x kv_heads x splits fills the GPU, from shapes only (graph-safe)."""
    want = SPLIT_TARGET_WAVES * _num_sms(device) // (batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_context, MIN_SPLIT_TOKENS), MAX_SPLITS))


def check_paged_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, device: torch.device
) -> None:
    """Shared wrapper checks for the paged K/V cache and block tables."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "k/v cache: [num_blocks, Hkv, Bs, D]"
    assert k_cache.stride() == v_cache.stride(), "k/v cache: same strides"
    assert k_cache.stride(-1) == 1, "k/v cache: D innermost"
    assert k_cache.dtype == v_cache.dtype, "k/v cache dtypes differ"
    assert k_cache.device == v_cache.device == block_tables.device == device, "all tensors on one device"
    assert block_tables.dtype == torch.int32, "block_tables: int32"
    assert block_tables.stride(1) == 1, "block_tables: rows contiguous"


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    num_splits: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Triton paged_decode_attention (same contract as the ref). num_splits/config override the defaults."""
    cfg = {**DECODE_CONFIG, **(config or {})}
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, block_size, _ = k_cache.shape
    check_paged_cache(k_cache, v_cache, block_tables, q.device)
    assert q.stride(-1) == 1 and q.dtype == k_cache.dtype, "q: D innermost, same dtype as the cache"
    assert k_cache.shape[3] == head_dim, "q and cache head_dim differ"
    assert num_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert block_tables.shape[0] == batch and context_lens.shape == (batch,), "one row per sequence"
    assert context_lens.dtype == torch.int32 and context_lens.device == q.device, "context_lens: int32"
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:  # never touched: the one slice writes out
        part = lse = out
    block_d = triton.next_power_of_2(head_dim)
    pdl = pdl_supported(q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, part, lse, out,
        scale * LOG2E, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, USE_WINDOW=sliding_window is not None,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=cfg["BLOCK_N"],
        DOT_FP32=not q.is_cuda, SPLIT=split, PDL=pdl,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_kwargs(pdl),
    )
    if not split:
        return out
    _decode_merge_kernel[(batch, num_heads)](
        part, lse, out, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), PDL=pdl, num_warps=4,
        **pdl_kwargs(pdl),
    )
    return out
