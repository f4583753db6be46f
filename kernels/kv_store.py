"""KV cache store: write each new token's key/value into its paged-cache slot."""
import torch
import triton
import triton.language as tl


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


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cn, stride_ch, stride_ct,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: all its heads, K and V.
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cn + (slot % BLOCK_SIZE) * stride_ct
    dst = dst + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def store_kv_triton(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton store_kv (same contract as the ref); key/value may be strided views (slices of a fused qkv)."""
    num_tokens, num_heads, head_dim = key.shape
    assert value.shape == key.shape and k_cache.shape == v_cache.shape, "key/value and k/v cache shapes"
    assert k_cache.dim() == 4 and k_cache.shape[1] == num_heads and k_cache.shape[3] == head_dim, (
        f"cache {tuple(k_cache.shape)} is not [num_blocks, {num_heads}, block_size, {head_dim}]")
    assert k_cache.stride() == v_cache.stride(), "k/v cache: same strides"
    assert k_cache.stride(-1) == 1, "k/v cache: D innermost"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "key/value: D innermost"
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, "key/value/cache dtypes differ"
    assert slot_mapping.shape == (num_tokens,), "slot_mapping: [T]"
    assert slot_mapping.dtype == torch.int64, "slot_mapping: int64"
    assert key.device == k_cache.device == slot_mapping.device, "all tensors on one device"
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
    )
