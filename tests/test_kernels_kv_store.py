"""KV store: reference against a per-token loop, Triton against the reference."""

import pytest
import torch

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import kv_store


def store_case(num_tokens, num_blocks, hkv, bs, d, dtype, device):
    """A poisoned 2-layer cache, key/value sliced out of a fused qkv (strided rows), distinct random slots."""
    kv_cache = torch.full((2, 2, num_blocks, hkv, bs, d), float("nan"), dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * bs, device=device)[:num_tokens]
    qkv = torch.randn(num_tokens, 3 * hkv * d, dtype=dtype, device=device)
    key, value = qkv[:, hkv * d : 2 * hkv * d].view(-1, hkv, d), qkv[:, 2 * hkv * d :].view(-1, hkv, d)
    return kv_cache, slots, key, value


def test_ref_writes_slots():
    kv_cache, slots, key, value = store_case(7, 6, 2, 4, 8, torch.float32, "cpu")
    want = kv_cache.clone()
    kv_store.store_kv_ref(key, value, kv_cache[1][0], kv_cache[1][1], slots)
    for i, slot in enumerate(slots.tolist()):
        want[1, 0, slot // 4, :, slot % 4] = key[i]
        want[1, 1, slot // 4, :, slot % 4] = value[i]
    assert torch.equal(kv_cache.nan_to_num(7.0), want.nan_to_num(7.0))


def check(num_tokens, num_blocks, hkv, bs, d, dtype, device):
    kv_cache, slots, key, value = store_case(num_tokens, num_blocks, hkv, bs, d, dtype, device)
    want = kv_cache.clone()
    kv_store.store_kv_ref(key, value, want[1][0], want[1][1], slots)
    kv_store.store_kv_triton(key, value, kv_cache[1][0], kv_cache[1][1], slots)
    assert torch.equal(
        kv_cache.nan_to_num(7.0), want.nan_to_num(7.0)
    )  # written slots exact, others untouched


@runs_triton
@pytest.mark.parametrize("hkv,d", [(2, 16), (3, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton(hkv, d, dtype):
    check(9, 6, hkv, 4, d, dtype, DEVICE)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu(dtype):
    check(8192, 1024, 8, 16, 128, dtype, DEVICE)
