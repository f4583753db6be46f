"""Paged decode/prefill attention: references against a naive per-token oracle."""
import math

import pytest
import torch
from pdserve.kernels.attention_decode import paged_decode_attention_ref
from pdserve.kernels.attention_prefill import paged_prefill_attention_ref


def make_cache(seq_lens, hkv, d, block_size, dtype, extra_blocks=3):
    """Random paged cache with shuffled, non-contiguous block ids; unused slots hold NaN."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    ids = torch.randperm(num_blocks)
    k_cache = torch.full((num_blocks, hkv, block_size, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    used = 0
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        table[s, :nb] = ids[used:used + nb].int()
        used += nb
        for p in range(n):
            blk, off = int(table[s, p // block_size]), p % block_size
            k_cache[blk, :, off] = torch.randn(hkv, d, dtype=dtype)
            v_cache[blk, :, off] = torch.randn(hkv, d, dtype=dtype)
    return k_cache, v_cache, table


def naive_attention(q, k_cache, v_cache, table_row, pos, scale, window):
    """One query token q [Hq, D] at position `pos`, looping over keys."""
    hq, hkv, bs = q.shape[0], k_cache.shape[1], k_cache.shape[2]
    lo = 0 if window is None else max(0, pos - window + 1)
    keys = range(lo, pos + 1)
    k = torch.stack([k_cache[int(table_row[p // bs]), :, p % bs] for p in keys], 1).float()  # [Hkv, n, D]
    v = torch.stack([v_cache[int(table_row[p // bs]), :, p % bs] for p in keys], 1).float()
    k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
    p = torch.softmax(torch.einsum("hd,hnd->hn", q.float(), k) * scale, -1)
    return torch.einsum("hn,hnd->hd", p, v)


CASES = [  # (seq_lens, Hq, Hkv, window)
    ([5, 17, 32], 4, 4, None),
    ([1, 40, 9], 8, 2, None),
    ([33, 12], 6, 2, 7),
]


@pytest.mark.parametrize("seq_lens,hq,hkv,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_ref(seq_lens, hq, hkv, window, dtype):
    d, bs = 16, 8
    k_cache, v_cache, table = make_cache(seq_lens, hkv, d, bs, dtype)
    q = torch.randn(len(seq_lens), hq, d, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    out = paged_decode_attention_ref(q, k_cache, v_cache, table, lens, scale, window)
    assert out.dtype == dtype and out.shape == q.shape
    for b, n in enumerate(seq_lens):
        want = naive_attention(q[b], k_cache, v_cache, table[b], n - 1, scale, window)
        torch.testing.assert_close(out[b].float(), want, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@pytest.mark.parametrize("seq_lens,hq,hkv,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_ref(seq_lens, hq, hkv, window, dtype):
    d, bs = 16, 8
    q_lens = [min(n, ql) for n, ql in zip(seq_lens, [1, 11, 4])]  # a decode token, a full prompt, a prefix
    k_cache, v_cache, table = make_cache(seq_lens, hkv, d, bs, dtype)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).int()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(d)
    out = paged_prefill_attention_ref(q, k_cache, v_cache, table, qsl, lens, scale, window)
    assert out.dtype == dtype and out.shape == q.shape
    for s, (n, ql) in enumerate(zip(seq_lens, q_lens)):
        for i in range(ql):
            t = int(qsl[s]) + i
            want = naive_attention(q[t], k_cache, v_cache, table[s], n - ql + i, scale, window)
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(out[t].float(), want, atol=tol, rtol=0)
