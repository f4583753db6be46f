"""Paged decode attention: one query token per sequence against its paged K/V cache."""
import torch
import torch.nn.functional as F


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
