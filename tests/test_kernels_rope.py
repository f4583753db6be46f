"""RoPE: cos/sin cache and rotation against Hugging Face Llama bit for bit; Triton against the ref."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import rope

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
]


def hf_cos_sin(d, max_pos, theta, scaling):
    config = LlamaConfig(
        hidden_size=4 * d,
        num_attention_heads=4,
        head_dim=d,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=max_pos,
    )
    pos = torch.arange(max_pos)[None]
    return LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)  # [1, P, D] each


@pytest.mark.parametrize("scaling", SCALINGS)
def test_cache_matches_hf(scaling):
    d, max_pos = 32, 300
    cache = rope.build_cos_sin_cache(d, max_pos, 500000.0, scaling)
    cos, sin = hf_cos_sin(d, max_pos, 500000.0, scaling)
    assert cache.dtype == torch.float32 and cache.shape == (max_pos, d)
    assert torch.equal(cache[:, : d // 2], cos[0, :, : d // 2])
    assert torch.equal(cache[:, d // 2 :], sin[0, :, : d // 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_ref_matches_hf(dtype):
    d, t, hq, hkv = 32, 9, 4, 2
    cache = rope.build_cos_sin_cache(d, 100, 10000.0, None)
    cos, sin = hf_cos_sin(d, 100, 10000.0, None)
    positions = torch.randint(0, 100, (t,))
    q, k = torch.randn(t, hq, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype)
    c, s = cos[0, positions].to(dtype), sin[0, positions].to(dtype)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), c, s, unsqueeze_dim=0)
    q_out, k_out = rope.rope_ref(q, k, positions, cache)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    assert torch.equal(q, want_q.transpose(0, 1)) and torch.equal(k, want_k.transpose(0, 1))


def check(num_tokens, hq, hkv, d, dtype, device):
    """In place on q and k viewed out of one fused qkv tensor, as the engine does; v stays untouched."""
    cache = rope.build_cos_sin_cache(d, 4096, 500000.0, SCALINGS[2]).to(device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    want = qkv.clone()
    rope.rope_ref(
        want[:, : hq * d].view(-1, hq, d), want[:, hq * d : (hq + hkv) * d].view(-1, hkv, d), positions, cache
    )
    q, k = qkv[:, : hq * d].view(-1, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(-1, hkv, d)
    rope.rope_triton(q, k, positions, cache)
    # Up to two ulps at |x| < 8: the compiled kernel lands one ulp off HF on ~13% of fp16 elements (H200), the
    # interpreter truncates fp32 -> bf16 instead of rounding to nearest, and fp32 may fuse a multiply-add.
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-4, torch.float16: 2**-7}[dtype]
    torch.testing.assert_close(qkv, want, atol=tol, rtol=tol)


@runs_triton
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton(hq, hkv, dtype):
    check(5, hq, hkv, 16, dtype, DEVICE)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(dtype):
    check(4096, 32, 8, 128, dtype, DEVICE)


def check_with_store(num_tokens, hq, hkv, d, block_size, dtype, device):
    """rope + the cache store in one kernel: q and k rotated in place in one fused qkv tensor, the rotated k
    and v written to their (scattered) slots, every other cache slot untouched; the same bits as the rope
    kernel followed by the store kernel."""
    from pdserve.kernels import kv_store

    cache = rope.build_cos_sin_cache(d, 4096, 500000.0, SCALINGS[2]).to(device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    num_blocks = 2 * num_tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    caches = torch.randn(2, num_blocks, hkv, block_size, d, dtype=dtype, device=device)

    def views(t):
        return (t[:, : hq * d].view(-1, hq, d), t[:, hq * d : (hq + hkv) * d].view(-1, hkv, d),
                t[:, (hq + hkv) * d :].view(-1, hkv, d))

    want, want_caches = qkv.clone(), caches.clone()
    rope.rope_store_kv_ref(*views(want), positions, cache, want_caches[0], want_caches[1], slots)
    two, two_caches = qkv.clone(), caches.clone()
    rope.rope_triton(*views(two)[:2], positions, cache)
    kv_store.store_kv_triton(*views(two)[1:], two_caches[0], two_caches[1], slots)
    rope.rope_store_kv_triton(*views(qkv), positions, cache, caches[0], caches[1], slots)
    assert torch.equal(qkv, two) and torch.equal(caches, two_caches)  # the two kernels' bits
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-4, torch.float16: 2**-7}[dtype]  # as `check`
    torch.testing.assert_close(qkv, want, atol=tol, rtol=tol)
    torch.testing.assert_close(caches, want_caches, atol=tol, rtol=tol)


@runs_triton
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_kv(hq, hkv, dtype):
    check_with_store(5, hq, hkv, 16, 4, dtype, DEVICE)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_store_kv_gpu(dtype):
    check_with_store(300, 32, 8, 128, 16, dtype, DEVICE)


def test_ops_rope_store_kv_is_the_reference_on_cpu():
    from pdserve.kernels import ops

    assert ops.rope_store_kv.__doc__ == rope.rope_store_kv_ref.__doc__
