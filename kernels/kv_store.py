"""KV cache store: write each new token's key/value into its paged-cache slot."""
import torch


def store_kv_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    slot_mapping: torch.Tensor,  # [T] int64, slot = block_id * block_size + offset
) -> None:
    """Write key/value token t into slot slot_mapping[t] of k_cache/v_cache, in place."""
    block_size = k_cache.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    # Two advanced indices around a slice put the indexed dim first: [T, Hkv, D], like key.
    k_cache[blocks, :, offsets] = key
    v_cache[blocks, :, offsets] = value
