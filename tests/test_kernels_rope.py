"""RoPE: cos/sin cache and rotation against Hugging Face Llama, bit for bit."""
import pytest
import torch
from pdserve.kernels.rope import build_cos_sin_cache, rope_ref
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


def hf_cos_sin(d, max_pos, theta, scaling):
    config = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, rope_theta=theta,
                         rope_scaling=scaling, max_position_embeddings=max_pos)
    pos = torch.arange(max_pos)[None]
    return LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)  # [1, P, D] each


@pytest.mark.parametrize("scaling", SCALINGS)
def test_cache_matches_hf(scaling):
    d, max_pos = 32, 300
    cache = build_cos_sin_cache(d, max_pos, 500000.0, scaling)
    cos, sin = hf_cos_sin(d, max_pos, 500000.0, scaling)
    assert cache.dtype == torch.float32 and cache.shape == (max_pos, d)
    assert torch.equal(cache[:, : d // 2], cos[0, :, : d // 2])
    assert torch.equal(cache[:, d // 2:], sin[0, :, : d // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_ref_matches_hf(dtype):
    d, t, hq, hkv = 32, 9, 4, 2
    cache = build_cos_sin_cache(d, 100, 10000.0, None)
    cos, sin = hf_cos_sin(d, 100, 10000.0, None)
    positions = torch.randint(0, 100, (t,))
    q, k = torch.randn(t, hq, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype)
    c, s = cos[0, positions].to(dtype), sin[0, positions].to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), c, s, unsqueeze_dim=0)
    q_out, k_out = rope_ref(q, k, positions, cache)
    assert k_out.data_ptr() == k.data_ptr()
    assert q_out.data_ptr() == q.data_ptr()
    assert torch.equal(q, want_q.transpose(0, 1)) and torch.equal(k, want_k.transpose(0, 1))
