"""Paged decode/prefill attention: references against a naive per-token oracle, Triton against the references
(under TRITON_INTERPRET on CPU at tiny shapes; real shapes on GPU)."""

import pytest
import torch

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import attention_decode, attention_prefill


def make_cache(seq_lens, hkv, d, block_size, dtype, device="cpu", extra_blocks=3):
    """Random paged cache with shuffled, non-contiguous block ids; unused slots hold NaN."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    ids = torch.randperm(num_blocks)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    valid = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    used = 0
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        table[s, :nb] = ids[used : used + nb].int()
        used += nb
        valid.view(-1)[
            (table[s, :nb].long()[:, None] * block_size + torch.arange(block_size)).view(-1)[:n]
        ] = True
    k_cache = torch.randn(num_blocks, hkv, block_size, d, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k_cache.masked_fill_(~valid[:, None, :, None], float("nan"))
    v_cache.masked_fill_(~valid[:, None, :, None], float("nan"))
    return k_cache.to(device), v_cache.to(device), table.to(device)


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


def assert_close(out, ref):
    """fp32: tight; bf16/fp16: the rounding of the output and of P before the PV product."""
    assert out.dtype == ref.dtype and out.shape == ref.shape and not out.isnan().any()
    tol = 1e-5 if out.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def prefill_batch(seq_lens, q_lens, hq, hkv, d, bs, dtype, device="cpu"):
    """Arguments of paged_prefill_attention up to seq_lens: k/v are the new tokens' rows of the cache."""
    k_cache, v_cache, table = make_cache(seq_lens, hkv, d, bs, dtype, device)
    q = torch.randn(sum(q_lens), hq, d, dtype=dtype, device=device)
    qsl = torch.tensor([0] + q_lens).cumsum(0).int().to(device)
    pos = torch.cat([torch.arange(n - ql, n) for n, ql in zip(seq_lens, q_lens)])
    seq = torch.cat([torch.full((ql,), s) for s, ql in enumerate(q_lens)])
    blocks = table.cpu()[seq, pos // bs].long().to(device)
    slots = (pos % bs).to(device)
    k, v = k_cache[blocks, :, slots], v_cache[blocks, :, slots]  # [T, Hkv, D]
    return q, k, v, k_cache, v_cache, table, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def hide_new_tokens_in_cache(args, q_lens):
    """NaN over the new tokens' cache slots (in copies): the Triton kernel must read those from k/v."""
    q, k, v, k_cache, v_cache, table, qsl, lens, *rest = args
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    bs = k_cache.shape[2]
    for s, ql in enumerate(q_lens):
        for p in range(int(lens[s]) - ql, int(lens[s])):
            k_cache[int(table[s, p // bs]), :, p % bs] = float("nan")
            v_cache[int(table[s, p // bs]), :, p % bs] = float("nan")
    return (q, k, v, k_cache, v_cache, table, qsl, lens, *rest)


CASES = [  # (seq_lens, q_lens for prefill, Hq, Hkv, window); lengths not multiples of the block size
    ([5, 17, 70], [1, 17, 30], 4, 4, None),
    ([1, 40, 9], [1, 11, 4], 8, 2, None),
    ([33, 12, 100], [5, 12, 70], 6, 2, 7),
    ([130, 3], [1, 3], 4, 1, 50),
]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", CASES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_ref(seq_lens, q_lens, hq, hkv, window, dtype):
    k_cache, v_cache, table = make_cache(seq_lens, hkv, 16, 8, dtype)
    q = torch.randn(len(seq_lens), hq, 16, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = attention_decode.paged_decode_attention_ref(q, k_cache, v_cache, table, lens, 0.25, window)
    want = torch.stack(
        [
            naive_attention(q[b], k_cache, v_cache, table[b], n - 1, 0.25, window)
            for b, n in enumerate(seq_lens)
        ]
    )
    assert_close(out, want.to(dtype))


@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", CASES[:3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_ref(seq_lens, q_lens, hq, hkv, window, dtype):
    q, k, v, k_cache, v_cache, table, qsl, lens = prefill_batch(seq_lens, q_lens, hq, hkv, 16, 8, dtype)
    out = attention_prefill.paged_prefill_attention_ref(
        q, k, v, k_cache, v_cache, table, qsl, lens, 0.25, window
    )
    want = [
        naive_attention(q[int(qsl[s]) + i], k_cache, v_cache, table[s], n - ql + i, 0.25, window)
        for s, (n, ql) in enumerate(zip(seq_lens, q_lens))
        for i in range(ql)
    ]
    assert_close(out, torch.stack(want).to(dtype))


@runs_triton
@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3, 40])  # 1: written without partials; 40: mostly empty slices
def test_decode_triton(seq_lens, q_lens, hq, hkv, window, dtype, num_splits, poisoned):
    k_cache, v_cache, table = make_cache(seq_lens, hkv, 16, 8, dtype)
    q = torch.randn(len(seq_lens), hq, 16, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    args = (q, k_cache, v_cache, table, lens, 0.25, window)
    out = attention_decode.paged_decode_attention_triton(*args, num_splits=num_splits, config={"BLOCK_N": 16})
    assert_close(out, attention_decode.paged_decode_attention_ref(*args))


@runs_triton
@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m", [16, 32])  # 32: two diagonal key tiles per row tile
def test_prefill_triton(seq_lens, q_lens, hq, hkv, window, dtype, block_m, poisoned):
    args = (*prefill_batch(seq_lens, q_lens, hq, hkv, 16, 8, dtype), 0.25, window)
    out = attention_prefill.paged_prefill_attention_triton(
        *hide_new_tokens_in_cache(args, q_lens), config={"BLOCK_M": block_m, "BLOCK_N": 16}
    )
    assert_close(out, attention_prefill.paged_prefill_attention_ref(*args))


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1000])
@pytest.mark.parametrize("num_splits", [None, 1, 64])  # None: the automatic choice (2 at 24 sequences)
def test_decode_gpu(dtype, window, num_splits, poisoned):
    seq_lens = torch.randint(1, 5000, (24,)).tolist()
    k_cache, v_cache, table = make_cache(seq_lens, 8, 128, 16, dtype, DEVICE)
    q = torch.randn(len(seq_lens), 32, 128, dtype=dtype, device=DEVICE)
    args = (
        q,
        k_cache,
        v_cache,
        table,
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        128**-0.5,
        window,
    )
    assert_close(
        attention_decode.paged_decode_attention_triton(*args, num_splits=num_splits),
        attention_decode.paged_decode_attention_ref(*args),
    )


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 700])
def test_prefill_gpu(dtype, window, poisoned):
    seq_lens, q_lens = [2048, 1500, 3000, 1, 777], [2048, 300, 1, 1, 777]
    args = (*prefill_batch(seq_lens, q_lens, 32, 8, 128, 16, dtype, DEVICE), 128**-0.5, window)
    assert_close(
        attention_prefill.paged_prefill_attention_triton(*hide_new_tokens_in_cache(args, q_lens)),
        attention_prefill.paged_prefill_attention_ref(*args),
    )


def fused_qkv_slice(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """`q` [T, Hq, D] as the model hands it over: a strided view of one fused [T, (Hq + 2 Hkv) * D] qkv row."""
    t, hq, d = q.shape
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=q.dtype, device=q.device)
    qkv[:, : hq * d] = q.reshape(t, -1)
    return qkv[:, : hq * d].view(t, hq, d)


def fused_qkv_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [T, Hq, D], k/v [T, Hkv, D] as strided views of one fused [T, (Hq + 2 Hkv) * D] qkv output."""
    t, _, d = q.shape
    qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], 1)
    q_, k_, v_ = qkv.split([q[0].numel(), k[0].numel(), v[0].numel()], 1)
    return q_.view(t, -1, d), k_.view(t, -1, d), v_.view(t, -1, d)


@runs_triton
@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", CASES[1:2])
def test_triton_takes_q_as_a_slice_of_fused_qkv(seq_lens, q_lens, hq, hkv, window, poisoned):
    k_cache, v_cache, table = make_cache(seq_lens, hkv, 16, 8, torch.float32)
    q = torch.randn(len(seq_lens), hq, 16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    strided = fused_qkv_slice(q, hkv)
    assert not strided.is_contiguous()
    decode = (k_cache, v_cache, table, lens, 0.25, window)
    out = attention_decode.paged_decode_attention_triton(strided, *decode, config={"BLOCK_N": 16})
    assert_close(out, attention_decode.paged_decode_attention_ref(q, *decode))


@runs_triton
@pytest.mark.parametrize("seq_lens,q_lens,hq,hkv,window", [CASES[0], CASES[2]])
@pytest.mark.parametrize("d", [16, 24])  # 24: a key tile's padding columns hold the next head's values
def test_prefill_triton_takes_q_k_v_as_slices_of_fused_qkv(seq_lens, q_lens, hq, hkv, window, d, poisoned):
    args = (*prefill_batch(seq_lens, q_lens, hq, hkv, d, 8, torch.float32), 0.25, window)
    views = fused_qkv_views(*args[:3])
    assert not any(x.is_contiguous() for x in views)
    out = attention_prefill.paged_prefill_attention_triton(
        *hide_new_tokens_in_cache((*views, *args[3:]), q_lens), config={"BLOCK_M": 16, "BLOCK_N": 16}
    )
    assert_close(out, attention_prefill.paged_prefill_attention_ref(*args))
