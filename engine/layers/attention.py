"""Paged attention over this layer's slice of the KV cache; metadata is passed in, never global."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pdserve.kernels import ops


@dataclass
class AttentionMetadata:
    """What every attention layer needs for one step (built once per step by the model runner)."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32: tokens in the cache after this step, per sequence
    decode_only: bool  # every sequence has exactly one new token


class Attention(nn.Module):
    def __init__(self, num_kv_heads: int, head_dim: int, sliding_window: int | None):
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim  # this rank's KV heads: they size its cache
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, Hkv, block_size, D], bound by the runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D]. rotary: (positions [T], cos_sin_cache) to rotate q
        # and k by first, in place, in the same kernel that stores k and v into the cache.
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        if rotary is None:
            ops.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            q, k = ops.rope_store_kv(q, k, v, *rotary, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            return ops.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, self.sliding_window
            )
        return ops.paged_prefill_attention(
            q, k, v, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
            self.scale, self.sliding_window,
        )
