"""Paged prefill attention: varlen causal attention of new tokens over a paged cache with a prefix."""
import torch
import torch.nn.functional as F
from pdserve.kernels.attention_decode import gather_paged_kv, key_mask


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
    own (and > position - sliding_window when set). GQA as in decode. fp32 math; returns [T, Hq, D] in q.dtype.

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
