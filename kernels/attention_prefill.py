"""Paged prefill attention: varlen causal attention of new tokens over a paged cache with a prefix."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdserve.kernels.attention_decode import LOG2E, check_paged_cache, gather_paged_kv, key_mask


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
# Program (tile, q head) owns BLOCK_M query rows of one sequence and streams that sequence's keys in tiles
# of BLOCK_N tokens with an online softmax, from the window start (if any) up to its last row's position:
# tiles wholly above the causal diagonal or before the window are never visited.
# Tiles are numbered without a host sync: sequence s owns tiles [qsl[s] // BLOCK_M + s, qsl[s+1] // BLOCK_M
# + s + 1); a program finds its sequence by binary search, and a grid of T // BLOCK_M + S + 1 covers all.
# NOTE: DOT_FP32 as in attention_decode (interpreter only).

# Within 2% (8x2048) and 5% (1x16384) of the best H200 config swept, with the least shared memory (portable).
PREFILL_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bt_ptr, qsl_ptr, lens_ptr,
    scale_log2, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kn, stride_kh, stride_kt, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Highest tiles first: they have the most keys, so the long programs start early.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq_lo, seq_hi = 0, num_seqs  # the owner of `tile` is in [seq_lo, seq_hi)
    while seq_hi - seq_lo > 1:
        mid = (seq_lo + seq_hi) // 2
        owns_from = tl.load(qsl_ptr + mid) // BLOCK_M + mid <= tile
        seq_lo = tl.where(owns_from, mid, seq_lo)
        seq_hi = tl.where(owns_from, seq_hi, mid)
    seq = seq_lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(lens_ptr + seq)
    m0 = (tile - q_start // BLOCK_M - seq) * BLOCK_M  # first row of this tile, within the sequence
    prefix = seq_len - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = prefix + offs_m  # [BLOCK_M]
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # Keys [lo, hi): up to the tile's last real row; none at all for a tile past the sequence's rows.
    hi = tl.where(m0 < q_len, tl.minimum(prefix + m0 + BLOCK_M, seq_len), 0)
    lo = tl.maximum(prefix + m0 - window + 1, 0) if USE_WINDOW else 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < hi
        page = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = page * stride_kn + kvh * stride_kh + (pos % BLOCK_SIZE) * stride_kt
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_M, BLOCK_N]
        keep = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if USE_WINDOW:
            keep &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(keep, s, float("-inf"))
        # A row can see no key in a tile (window, diagonal): keep its running max finite so exp2 gives 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Triton paged_prefill_attention (same contract as the ref); `config` overrides PREFILL_CONFIG."""
    cfg = {**PREFILL_CONFIG, **(config or {})}
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, num_kv_heads, block_size, _ = k_cache.shape
    check_paged_cache(k_cache, v_cache, block_tables, q.device)
    assert q.stride(-1) == 1 and q.dtype == k_cache.dtype, "q: D innermost, same dtype as the cache"
    assert k_cache.shape[3] == head_dim, "q and cache head_dim differ"
    assert num_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert query_start_loc.shape == (num_seqs + 1,), "query_start_loc: [S+1]"
    assert block_tables.shape[0] == num_seqs, "block_tables: one row per sequence"
    assert query_start_loc.dtype == seq_lens.dtype == torch.int32, "query_start_loc, seq_lens: int32"
    assert query_start_loc.device == seq_lens.device == q.device, "all tensors on one device"
    out = torch.empty_like(q)
    num_tiles = num_tokens // cfg["BLOCK_M"] + num_seqs + 1
    _prefill_kernel[(num_tiles, num_heads)](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        USE_WINDOW=sliding_window is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=triton.next_power_of_2(head_dim), DOT_FP32=not q.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
