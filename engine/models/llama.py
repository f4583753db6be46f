"""The Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) as one parametrised model.

Variants differ only in flags of `ModelSpec`: qkv bias (Qwen2), per-head QK-norm (Qwen3),
tied embeddings, rope scaling, sliding window. All sequences of a step are one flat token
batch `[T, ...]`; attention reads the paged cache through `AttentionMetadata`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from pdserve.engine.layers.attention import Attention, AttentionMetadata
from pdserve.engine.layers.basic import RMSNorm, RotaryEmbedding
from pdserve.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pdserve.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.parallel import TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, max_positions: int):
        super().__init__()
        d = spec.head_dim
        self.qkv_proj = QKVParallelLinear(
            spec.hidden_size, d, spec.num_heads, spec.num_kv_heads, tp, bias=spec.qkv_bias
        )
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        q_start, q_end = self.qkv_proj.q_range
        self.o_proj = RowParallelLinear(spec.num_heads * d, spec.hidden_size, tp, input_range=(q_start * d, q_end * d),
                                        reduce_results=False)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(d, spec.rms_norm_eps) if spec.qk_norm else None
        self.rotary = RotaryEmbedding(d, max_positions, spec.rope_theta, spec.rope_scaling)
        self.attn = Attention(self.num_kv_heads, d, spec.sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]
        T, d = x.shape[0], self.attn.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k, v = q.reshape(T, -1, d), k.reshape(T, -1, d), v.reshape(T, -1, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # NOTE: q, k, v stay strided views of the fused qkv output: rope with the cache store (one kernel)
        # and attention take rows with any stride (D innermost), so no per-layer copies.
        out = self.attn(q, k, v, meta, rotary=(positions, self.rotary.cos_sin_cache))
        return out.reshape(T, -1)  # [T, Hq * D]: o_proj's input (the layer applies it)


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup):
        super().__init__()
        inter = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [inter, inter], tp)
        self.down_proj = RowParallelLinear(inter, spec.hidden_size, tp, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate_up_proj.forward_silu_and_mul(x)  # down_proj's input (the layer applies it)


class LlamaDecoderLayer(nn.Module):
    """Takes the normalized hidden states and the residual stream; returns them for whatever follows, whose
    norm (the next layer's input norm, or the model's final one) it is given: each row-parallel projection
    (o_proj, down_proj) is summed over the gang together with the residual add + RMSNorm after it (one
    kernel on small GPU batches, and with `push_gemm` the GEMM pushes its rows itself). Slot 0 reduces
    attention outputs, slot 1 MLP outputs, so consecutive reductions alternate."""

    def __init__(self, spec: ModelSpec, tp: TPGroup, max_positions: int):
        super().__init__()
        self.self_attn = LlamaAttention(spec, tp, max_positions)
        self.mlp = LlamaMLP(spec, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, positions, x, residual, meta, next_norm: RMSNorm):
        # x: input_layernorm(residual); returns (next_norm(residual'), residual')
        x = self.self_attn(positions, x, meta)
        x, residual = self.self_attn.o_proj.forward_add_norm(x, residual, self.post_attention_layernorm, slot=0)
        return self.mlp.down_proj.forward_add_norm(self.mlp(x), residual, next_norm, slot=1)


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (parameter name fragment, shard id) for merged projections
    packed_modules: ClassVar[dict[str, tuple[str, object]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, spec: ModelSpec, tp: TPGroup, max_positions: int):
        super().__init__()
        self.spec, self.tp = spec, tp
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, tp, max_positions) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, hidden]. layer_hook(i): called once layer i's work,
        # which stores its KV, is enqueued (a KV sender marks the layer written on the device timeline).
        residual = self.embed_tokens(input_ids)
        x = self.layers[0].input_layernorm(residual)
        for i, layer in enumerate(self.layers):
            following = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            x, residual = layer(positions, x, residual, meta, following)
            if layer_hook is not None:
                layer_hook(i)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] fp32
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]
