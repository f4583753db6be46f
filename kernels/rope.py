"""Rotary position embedding (Neox / HF-Llama rotate_half style) and its cos/sin cache."""
import math

import torch


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


def build_cos_sin_cache(head_dim: int, max_pos: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
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
