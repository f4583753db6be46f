"""Small layers around the kernels: RMSNorm (with fused residual add), RoPE's cos/sin table (applied by
the attention layer's cache store, ops.rope_store_kv)."""
from __future__ import annotations

import torch
from torch import nn

from pdserve.kernels import ops
from pdserve.kernels.rope import build_cos_sin_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        cache = build_cos_sin_cache(head_dim, max_positions, theta, scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)  # [max_pos, D] fp32
