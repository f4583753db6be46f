"""Rotary position embedding (Neox / HF-Llama rotate_half style) and its cos/sin cache."""
import math

import torch
import triton
import triton.language as tl

from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.launch import pdl_kwargs, pdl_supported


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # Same arithmetic as transformers' rope init functions, so tables match bit for bit.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported (none, 'linear', 'llama3')")


def build_cos_sin_cache(
    head_dim: int, max_pos: int, theta: float, scaling: dict | None = None
) -> torch.Tensor:
    """Return [max_pos, head_dim] fp32: cos(freqs) in cols [0, D/2), sin(freqs) in [D/2, D).

    HF's emb = cat(freqs, freqs) has two equal halves, so one half of each is enough.
    `scaling` is the HF `rope_scaling` dict (key `rope_type` or `type`): None, linear or llama3.
    """
    inv_freq = _inv_freq(head_dim, theta, scaling)
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos/sin: [T, 1, D] in x.dtype. HF: x * cos + rotate_half(x) * sin.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] fp32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place by their positions; returns (q, k)."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache[positions]  # [T, D]
    cos = cs[:, :half].repeat(1, 2)[:, None, :]
    sin = cs[:, half:].repeat(1, 2)[:, None, :]
    q.copy_(_rotate(q, cos.to(q.dtype), sin.to(q.dtype)))
    k.copy_(_rotate(k, cos.to(k.dtype), sin.to(k.dtype)))
    return q, k


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # x: one token's [NUM_HEADS, 2*HALF] at x_ptr; cos/sin: [BLOCK_HALF] fp32 already rounded to x's dtype.
    offs_h = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs < HALF)[None, :]
    ptr1 = x_ptr + offs_h[:, None] * stride_h + offs[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(ptr1, mask=mask).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask).to(tl.float32)
    # Round each product to x's dtype before the sum, as HF's q * cos + rotate_half(q) * sin does (compiled,
    # this was measured within one ulp of HF, not bit-exact).
    o1 = (x1 * cos[None, :]).to(dtype).to(tl.float32) - (x2 * sin[None, :]).to(dtype).to(tl.float32)
    o2 = (x2 * cos[None, :]).to(dtype).to(tl.float32) + (x1 * sin[None, :]).to(dtype).to(tl.float32)
    tl.store(ptr1, o1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, o2.to(dtype), mask=mask)
    return o1.to(dtype), o2.to(dtype)


def rope_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rope (same contract as the ref), in place; q/k may be strided views (slices of a fused qkv)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, "k: [T, Hkv, D] like q"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype, "q/k: D innermost, one dtype"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim, "cos_sin_cache: [max_pos, D]"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(-1) == 1, "cos_sin_cache: fp32"
    assert positions.shape == (num_tokens,) and positions.dtype == torch.int64, "positions: [T] int64"
    assert q.device == k.device == positions.device == cos_sin_cache.device, "all tensors on one device"
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](  # no store: the cache arguments are never read
        q, k, k, positions, cos_sin_cache, k, k, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0, cos_sin_cache.stride(0), 0, 0, 0,
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half, BLOCK_SIZE=1,
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), STORE=False, PDL=False, num_warps=4,
    )
    return q, k


def rope_store_kv_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, D] fp32
    k_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    v_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_ref(q, k, ...) in place, then store_kv_ref of the rotated k and of v; returns (q, k)."""
    q, k = rope_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c, stride_cn, stride_ch, stride_ct,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr, STORE: tl.constexpr,
    PDL: tl.constexpr,
):
    # One program per token: the rotation of its q and k heads (in place; both share one cos/sin load), and
    # with STORE the write of the rotated k and of v into the token's cache slot (as _store_kv_kernel does).
    t = tl.program_id(0).to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_wait()  # the kernel before (the qkv projection) has finished
    pos = tl.load(pos_ptr + t)
    offs = tl.arange(0, BLOCK_HALF)
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(cache_ptr + pos * stride_c + offs, mask=offs < HALF).to(dtype).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_c + HALF + offs, mask=offs < HALF).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    k1, k2 = _rotate_heads(k_ptr + t * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)
    if STORE:
        slot = tl.load(slot_ptr + t)
        offs_h = tl.arange(0, BLOCK_KH)
        mask = (offs_h < NUM_K_HEADS)[:, None] & (offs < HALF)[None, :]
        dst = (slot // BLOCK_SIZE) * stride_cn + (slot % BLOCK_SIZE) * stride_ct + offs_h[:, None] * stride_ch
        dst = dst + offs[None, :]
        tl.store(k_cache_ptr + dst, k1, mask=mask)
        tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
        src = v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs[None, :]
        tl.store(v_cache_ptr + dst, tl.load(src, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst + HALF, tl.load(src + HALF, mask=mask), mask=mask)


def rope_store_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rope_store_kv (same contract as the ref), one kernel; q/k/v may be strided views of a fused
    qkv output. On Hopper it is launched as a programmatic dependent launch (kernels/launch.py)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, "k: [T, Hkv, D] like q"
    assert v.shape == k.shape and v.stride(-1) == 1 and v.dtype == k.dtype, "v: [T, Hkv, D] like k"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and q.dtype == k.dtype, "q/k: D innermost, one dtype"
    assert head_dim % 2 == 0, "head_dim: even"
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim, "cos_sin_cache: [max_pos, D]"
    assert cos_sin_cache.dtype == torch.float32 and cos_sin_cache.stride(-1) == 1, "cos_sin_cache: fp32"
    assert positions.shape == (num_tokens,) and positions.dtype == torch.int64, "positions: [T] int64"
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), "k/v cache: same layout"
    assert k_cache.dim() == 4 and k_cache.shape[1] == k.shape[1] and k_cache.shape[3] == head_dim, (
        f"cache {tuple(k_cache.shape)} is not [num_blocks, {k.shape[1]}, block_size, {head_dim}]")
    assert k_cache.stride(-1) == 1 and k_cache.dtype == k.dtype, "k/v cache: D innermost, k's dtype"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64, "slot_mapping: [T] int64"
    assert len({t.device for t in (q, k, v, positions, cos_sin_cache, k_cache, slot_mapping)}) == 1, "one device"
    half = head_dim // 2
    pdl = pdl_supported(q.device)
    _rope_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=k.shape[1], HALF=half, BLOCK_SIZE=k_cache.shape[2],
        BLOCK_QH=triton.next_power_of_2(num_q_heads), BLOCK_KH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), STORE=True, PDL=pdl, num_warps=4, **pdl_kwargs(pdl),
    )
    return q, k
