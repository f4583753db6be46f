"""Paged prefill attention: varlen causal attention of new tokens over a paged cache with a prefix."""
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from pdserve.kernels.attention_decode import LOG2E, check_paged_cache, gather_paged_kv, key_mask


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D], the new tokens of S sequences concatenated
    k: torch.Tensor,  # [T, Hkv, D], the new tokens' keys (also already in the cache)
    v: torch.Tensor,  # [T, Hkv, D], the new tokens' values (likewise)
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

    `k`/`v` repeat what the cache holds for the new tokens (the cache store runs first): this reference
    reads every key from the cache and ignores them; the Triton kernel reads the prefix from the cache and
    the new tokens from `k`/`v`.
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
    keys, values = gather_paged_kv(k_cache, v_cache, block_tables, seq_lens)
    mask = key_mask(q_pos, keys.shape[2], sliding_window)
    qp = q.float()[rows].transpose(1, 2)  # [S, Hq, M, D]
    out = F.scaled_dot_product_attention(qp, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[real].to(q.dtype)  # [T, Hq, D]


# ---------------------------------------------------------------- Triton (flash attention over pages)
# Program (tile, q head) owns BLOCK_M query rows of one sequence and streams that sequence's keys in tiles
# of BLOCK_N tokens with an online softmax, from the window start (if any) up to its last row's position:
# tiles wholly above the causal diagonal or before the window are never visited.
# Keys come from two places: the prefix (positions < seq_len - q_len, earlier steps) from the paged cache
# through the block table, the new tokens from the rows of `k`/`v`, whole tiles at once through tensor
# descriptors (the copy engine on Hopper, with no address arithmetic in the program), as are q's rows.
# Only the tiles that straddle an edge pay for a mask: the prefix's partial last tile and the new tokens'
# diagonal tiles; with a sliding window every tile is masked (its start cuts rows at different keys).
# Tiles are numbered without a host sync: sequence s owns tiles [qsl[s] // BLOCK_M + s, qsl[s+1] // BLOCK_M
# + s + 1); a program finds its sequence by binary search, and a grid of T // BLOCK_M + S + 1 covers all.
# NOTE: DOT_FP32 as in attention_decode (interpreter only).

# The best of the H200 sweeps over both prefill shapes (docs/benchmarks.md, Kernels). Its ~225 KiB of shared
# memory is Hopper's limit: GPUs with less get 64-key tiles (~130 KiB).
PREFILL_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
SMALL_SMEM_CONFIG = {**PREFILL_CONFIG, "BLOCK_N": 64}
PREFILL_CONFIG_SMEM = 225 << 10  # bytes of shared memory PREFILL_CONFIG takes (head_dim 128, 16-bit)


@functools.cache
def default_config(device: torch.device) -> dict:
    """PREFILL_CONFIG where the device's per-block shared memory holds it, else SMALL_SMEM_CONFIG."""
    if device.type != "cuda":
        return PREFILL_CONFIG
    smem = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    return SMALL_SMEM_CONFIG if smem is not None and smem < PREFILL_CONFIG_SMEM else PREFILL_CONFIG


@triton.jit
def _attend(q, k, v, acc, m_i, l_i, keep, scale_log2, MASKED: tl.constexpr, DOT_FP32: tl.constexpr):
    """One online-softmax step over a key tile; `keep` is read only when MASKED."""
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(keep, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row can see no key yet (window, diagonal): keep its running max finite so exp2 gives 0.
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        p = tl.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_desc, k_desc, v_desc, kc_ptr, vc_ptr, o_ptr, bt_ptr, qsl_ptr, lens_ptr,
    scale_log2, window, num_seqs,
    stride_ot, stride_oh,
    stride_cn, stride_ch, stride_cb, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
):
    # Highest tiles first: they have the most keys, so the long programs start early. The tile index
    # varies fastest, so the programs in flight share one head's keys (and the next heads of its kv group
    # reread them from L2).
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
    m0 = (tile - q_start // BLOCK_M - seq) * BLOCK_M  # first row of this tile, within the sequence
    if m0 >= q_len:  # a spare tile past the sequence's rows
        return
    prefix = tl.load(lens_ptr + seq) - q_len

    offs_m = m0 + tl.arange(0, BLOCK_M)  # rows (new-token index within the sequence)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    # Rows past q_len are the next sequence's queries (their results are not stored).
    q = q_desc.load([q_start + m0, h * HEAD_DIM])
    if DOT_FP32:
        q = q.to(tl.float32)
    if BLOCK_D != HEAD_DIM:  # the padding columns hold the next head's first ones: zero them
        q = tl.where(d_mask[None, :], q, 0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    q_pos = prefix + offs_m  # absolute positions
    # First key any row of the tile may see; tiles start BLOCK_N-aligned, the window mask trims the rest.
    lo = tl.maximum(prefix + m0 - window + 1, 0) if USE_WINDOW else 0

    # Prefix keys (paged cache). Every one precedes every row: no causal mask.
    pre_full = prefix // BLOCK_N * BLOCK_N
    pre_lo = tl.minimum(lo, prefix) // BLOCK_N * BLOCK_N
    for n0 in range(pre_lo, pre_full, BLOCK_N):
        pos = n0 + offs_n
        page = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE).to(tl.int64)
        kv_off = (page * stride_cn + kvh * stride_ch + (pos % BLOCK_SIZE) * stride_cb)[:, None] + offs_d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=d_mask[None, :], other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=d_mask[None, :], other=0.0)
        keep = pos[None, :] > q_pos[:, None] - window
        acc, m_i, l_i = _attend(q, k, v, acc, m_i, l_i, keep, scale_log2, USE_WINDOW, DOT_FP32)
    for n0 in range(tl.maximum(pre_lo, pre_full), prefix, BLOCK_N):  # the partial last tile, if any
        pos = n0 + offs_n
        n_mask = pos < prefix
        page = tl.load(bt_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = (page * stride_cn + kvh * stride_ch + (pos % BLOCK_SIZE) * stride_cb)[:, None] + offs_d[None, :]
        nd_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(kc_ptr + kv_off, mask=nd_mask, other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=nd_mask, other=0.0)
        keep = n_mask[None, :]
        if USE_WINDOW:
            keep &= pos[None, :] > q_pos[:, None] - window
        acc, m_i, l_i = _attend(q, k, v, acc, m_i, l_i, keep, scale_log2, True, DOT_FP32)

    # New tokens ([T, Hkv * D] rows of k/v), below the diagonal: every key precedes every row.
    # NOTE: with BLOCK_D > HEAD_DIM a tile also holds the next head's first columns; q zeroed its own.
    for n0 in range(tl.maximum(lo - prefix, 0) // BLOCK_N * BLOCK_N, m0, BLOCK_N):
        k = k_desc.load([q_start + n0, kvh * HEAD_DIM])
        v = v_desc.load([q_start + n0, kvh * HEAD_DIM])
        keep = (n0 + offs_n)[None, :] > offs_m[:, None] - window
        acc, m_i, l_i = _attend(q, k, v, acc, m_i, l_i, keep, scale_log2, USE_WINDOW, DOT_FP32)
    # The diagonal tiles: key j is seen by rows >= j. Rows past q_len are the next sequence's (finite) or
    # past T (the copy fills zeros): the causal test drops them for every real row.
    for n0 in range(m0, tl.minimum(m0 + BLOCK_M, q_len), BLOCK_N):
        idx = n0 + offs_n
        k = k_desc.load([q_start + n0, kvh * HEAD_DIM])
        v = v_desc.load([q_start + n0, kvh * HEAD_DIM])
        keep = idx[None, :] <= offs_m[:, None]
        if USE_WINDOW:
            keep &= idx[None, :] > offs_m[:, None] - window
        acc, m_i, l_i = _attend(q, k, v, acc, m_i, l_i, keep, scale_log2, True, DOT_FP32)

    # Every real row saw at least its own key; a padding row past q_len may have seen none (window).
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    q_rows = (q_start + offs_m).to(tl.int64)
    tl.store(o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def paged_prefill_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    sliding_window: int | None = None, config: dict | None = None,
) -> torch.Tensor:
    """Triton paged_prefill_attention (same contract as the ref); `config` overrides default_config().

    Reads the prefix's keys/values from the cache and the new tokens' from `k`/`v`. q, k, v: any token
    stride, but heads packed (stride(1) == D) and rows 16-byte aligned, as tensor descriptors need.
    """
    cfg = {**default_config(q.device), **(config or {})}
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    _, num_kv_heads, block_size, _ = k_cache.shape
    check_paged_cache(k_cache, v_cache, block_tables, q.device)
    assert q.dtype == k_cache.dtype, "q: same dtype as the cache"
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), "k, v: [T, Hkv, D]"
    assert k.dtype == v.dtype == q.dtype, "k, v: q's dtype"
    for x in (q, k, v):
        assert x.stride(2) == 1 and x.stride(1) == head_dim, "q, k, v: D innermost, heads packed in each row"
        assert x.data_ptr() % 16 == 0 and x.stride(0) * x.element_size() % 16 == 0, "q, k, v: rows 16-byte aligned"
    assert k.device == v.device == q.device, "all tensors on one device"
    assert k_cache.shape[3] == head_dim, "q and cache head_dim differ"
    assert num_heads % num_kv_heads == 0, "q heads must be a multiple of kv heads"
    assert query_start_loc.shape == (num_seqs + 1,), "query_start_loc: [S+1]"
    assert block_tables.shape[0] == num_seqs, "block_tables: one row per sequence"
    assert query_start_loc.dtype == seq_lens.dtype == torch.int32, "query_start_loc, seq_lens: int32"
    assert query_start_loc.device == seq_lens.device == q.device, "all tensors on one device"
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # Key tiles are BLOCK_N-aligned: the diagonal ones must start at a row tile's first row.
    assert block_m % block_n == 0, "BLOCK_N must divide BLOCK_M"
    block_d = triton.next_power_of_2(head_dim)
    q_desc, k_desc, v_desc = (
        TensorDescriptor.from_tensor(x.as_strided((num_tokens, x.shape[1] * head_dim), (x.stride(0), 1)),
                                     [rows, block_d])
        for x, rows in ((q, block_m), (k, block_n), (v, block_n))
    )
    out = torch.empty_like(q)
    num_tiles = num_tokens // block_m + num_seqs + 1
    _prefill_kernel[(num_tiles, num_heads)](
        q_desc, k_desc, v_desc, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E, sliding_window or 0, num_seqs,
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        USE_WINDOW=sliding_window is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, DOT_FP32=not q.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
