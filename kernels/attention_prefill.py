"""Paged prefill attention: varlen causal attention of new tokens over a paged cache with a prefix."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.attention_decode import (
    LOG2E,
    check_paged_cache,
    gather_paged_kv,
    key_mask,
    load_block_ids,
    paged_kv_offsets,
)


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D], the new tokens of S sequences concatenated
    k_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, Bs, D]
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start_loc: torch.Tensor,  # [S+1] int32, cumulative query lengths
    seq_lens: torch.Tensor,  # [S] int32, prefix + new tokens; all their K/V already in the cache
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Query i of sequence s sits at position seq_len - q_len + i and attends to keys at positions <= its
    own (and > position - sliding_window when set). GQA as in decode. fp32 math; returns [T, Hq, D] in
    q.dtype.

    Vectorized by padding each sequence's queries to the longest (S x max_q x max_seq).
    """
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts  # [S]
    max_q = int(q_lens.max())
    i = torch.arange(max_q, device=q.device)
    real = i[None, :] < q_lens[:, None]  # [S, M]
    # Padding rows repeat the sequence's last query so every row attends to at least one key.
    rows = starts[:, None] + torch.minimum(i[None, :], q_lens[:, None] - 1)  # [S, M]
    q_pos = seq_lens.long()[:, None] - q_lens[:, None] + (rows - starts[:, None])
    k, v = gather_paged_kv(k_cache, v_cache, block_tables, seq_lens)
    mask = key_mask(q_pos, k.shape[2], sliding_window)
    qp = q.float()[rows].transpose(1, 2)  # [S, Hq, M, D]
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[real].to(q.dtype)  # [T, Hq, D]


# ---------------------------------------------------------------- Triton (flash attention over pages)
# FlashAttention-2 over pages. Program (tile, kv head) owns TILE_TOKENS query tokens of one sequence and all
# GROUP query heads of its kv head, folded into the M dimension: row r is token r // GROUP, head r % GROUP
# (BLOCK_M rows, TILE_TOKENS = BLOCK_M // GROUP), and each K/V tile it loads serves the whole group.
# Why fold rather than one program per q head: registers bound the rows per program either way, and at equal
# rows the K/V bytes per FLOP are equal; but a folded tile spans GROUP times fewer tokens, so the masked
# diagonal wastes about BLOCK_N / 2 keys per row instead of BLOCK_N (128-token tiles), a sequence's last
# partial tile wastes GROUP times fewer rows, and a q_len 1 row fills GROUP rows of its tile instead of one.
# Keys stream in tiles of BLOCK_N (multiples of BLOCK_N, so a tile holds whole blocks) with an online softmax
# in the log2 domain and one normalisation at the end. Two stages: tiles under every row's diagonal and
# inside every row's window run without any mask; only the diagonal tiles and the window's first tiles do.
# Tiles are numbered without a host sync: sequence s owns tiles [qsl[s] // TILE_TOKENS + s,
# qsl[s+1] // TILE_TOKENS + s + 1); a program finds its sequence by binary search; T // TILE_TOKENS + S + 1
# programs per kv head cover all (a surplus tile visits no key and stores nothing).
# NOTE: DOT_FP32 as in attention_decode (interpreter only).

# 16-bit head_dim <= 128 on H100/H200 (the FlashAttention-2 tutorial shape: two warpgroups of 64 rows, K/V
# two tiles ahead, 128 KB of shared memory, 179 registers, no spills when compiled for sm_90). Rows of more than
# 256 bytes (head_dim 256, or fp32) double every tile: half the rows, one tile ahead (160 KB; 4 warps spill).
PREFILL_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
WIDE_ROW_CONFIG = {"BLOCK_M": 64, "num_stages": 2}


@triton.jit
def _load_tile(ptrs, n_ok, d_ok, MASKED: tl.constexpr, EVEN_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """A K or V tile [BLOCK_N, BLOCK_D], masked only where a mask can cut something: keys past the last row
    (MASKED tiles only) and head_dim padding (when head_dim is not a power of two)."""
    if MASKED:
        x = tl.load(ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _attend_tiles(
    acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, bt_row, start, end, hi, window, scale_log2,
    stride_kn, stride_kt,
    MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_TOKENS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """Online softmax of the rows q [BLOCK_M, BLOCK_D] (positions q_pos) over key tiles [start, end).

    MASKED: causal/window masks and key positions >= hi (unwritten cache slots) cut; else every key is seen
    by every row, so the tile loads and scores without masks.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    page = load_block_ids(bt_row, start, hi, BLOCK_SIZE, BLOCK_N, PAGE_TOKENS)
    for n0 in range(start, end, BLOCK_N):
        kv_off = paged_kv_offsets(page, n0, stride_kn, stride_kt, BLOCK_SIZE, BLOCK_N, PAGE_TOKENS)
        page = load_block_ids(bt_row, n0 + BLOCK_N, hi, BLOCK_SIZE, BLOCK_N, PAGE_TOKENS)  # see paged_kv_offsets
        kv_ptrs = kv_off[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        pos = n0 + offs_n
        k = _load_tile(k_ptr + kv_ptrs, pos < hi, d_ok, MASKED, BLOCK_D == HEAD_DIM, DOT_FP32)
        s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], unscaled: the scale folds into exp2's argument below
        if MASKED:
            keep = pos[None, :] <= q_pos[:, None]
            if USE_WINDOW:
                keep &= pos[None, :] > q_pos[:, None] - window
            s = tl.where(keep, s, float("-inf"))
            # A row can see no key of a masked tile: keep its running max finite so exp2 gives 0, not NaN.
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale_log2 - m_new[:, None])  # one FMA per score, log2 domain
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr + kv_ptrs, pos < hi, d_ok, MASKED, BLOCK_D == HEAD_DIM, DOT_FP32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qsl_ptr, lens_ptr,
    scale_log2, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kn, stride_kh, stride_kt, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
    TILE_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_TOKENS: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Highest tiles first: they have the most keys, so the long programs start early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    seq_lo, seq_hi = 0, num_seqs  # the owner of `tile` is in [seq_lo, seq_hi)
    while seq_hi - seq_lo > 1:
        mid = (seq_lo + seq_hi) // 2
        owns_from = tl.load(qsl_ptr + mid) // TILE_TOKENS + mid <= tile
        seq_lo = tl.where(owns_from, mid, seq_lo)
        seq_hi = tl.where(owns_from, seq_hi, mid)
    seq = seq_lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    prefix = tl.load(lens_ptr + seq) - q_len
    t0 = (tile - q_start // TILE_TOKENS - seq) * TILE_TOKENS  # first token of this tile, within the sequence

    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // GROUP  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = (rows < TILE_TOKENS * GROUP) & (tok < q_len)
    io_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_pos = prefix + tok
    q_row = (q_start + tok).to(tl.int64)
    head = kvh * GROUP + rows % GROUP
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys [.., hi) up to the tile's last real row: none for a tile past the sequence's rows.
    valid = t0 < q_len
    first = prefix + t0  # the tile's first row's position
    hi = tl.where(valid, prefix + tl.minimum(t0 + TILE_TOKENS, q_len), 0)
    full_hi = tl.where(valid, (first + 1) // BLOCK_N * BLOCK_N, 0)  # tiles below: under every row's diagonal
    if USE_WINDOW:
        lo = tl.minimum(tl.maximum(first - window + 1, 0) // BLOCK_N * BLOCK_N, full_hi)
        # Tiles from here on are inside the last row's window, so inside every row's.
        full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N, lo), full_hi)
    else:
        lo, full_lo = 0, 0
    k_ptr += kvh * stride_kh
    v_ptr += kvh * stride_kh
    bt_row = bt_ptr + seq * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # [lo, full_lo): the window's first tiles; [full_lo, full_hi): unmasked; [full_hi, hi): the diagonal.
    if USE_WINDOW:
        acc, l_i, m_i = _attend_tiles(
            acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, bt_row, lo, full_lo, hi, window, scale_log2,
            stride_kn, stride_kt, True, USE_WINDOW, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, PAGE_TOKENS, DOT_FP32)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, bt_row, full_lo, full_hi, hi, window, scale_log2,
        stride_kn, stride_kt, False, USE_WINDOW, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, PAGE_TOKENS, DOT_FP32)
    acc, l_i, m_i = _attend_tiles(
        acc, l_i, m_i, q, q_pos, k_ptr, v_ptr, bt_row, full_hi, hi, hi, window, scale_log2,
        stride_kn, stride_kt, True, USE_WINDOW, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D, PAGE_TOKENS, DOT_FP32)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=io_mask)


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton paged_prefill_attention (same contract as the ref); `config` overrides PREFILL_CONFIG.

    BLOCK_M counts rows (tokens x the group's query heads); it is raised to the group size when smaller.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, num_kv_heads, block_size, _ = k_cache.shape
    wide = head_dim * q.element_size() > 256
    cfg = {**PREFILL_CONFIG, **(WIDE_ROW_CONFIG if wide else {}), **(config or {})}
    check_paged_cache(k_cache, v_cache, block_tables, q.device)
    assert q.stride(-1) == 1 and q.dtype == k_cache.dtype, "q: D innermost, same dtype as the cache"
    assert k_cache.shape[3] == head_dim, "q and cache head_dim differ"
    assert num_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert query_start_loc.shape == (num_seqs + 1,), "query_start_loc: [S+1]"
    assert block_tables.shape[0] == num_seqs, "block_tables: one row per sequence"
    assert query_start_loc.dtype == seq_lens.dtype == torch.int32, "query_start_loc, seq_lens: int32"
    assert query_start_loc.device == seq_lens.device == q.device, "all tensors on one device"
    group = num_heads // num_kv_heads
    block_m = max(cfg["BLOCK_M"], triton.next_power_of_2(group))
    tile_tokens = block_m // group
    out = torch.empty_like(q)
    _prefill_kernel[(num_tokens // tile_tokens + num_seqs + 1, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, USE_WINDOW=sliding_window is not None,
        TILE_TOKENS=tile_tokens, BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_TOKENS=min(cfg["BLOCK_N"], block_size),
        DOT_FP32=not q.is_cuda, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
