"""KV store: reference against a per-token loop."""
import torch
from pdserve.kernels.kv_store import store_kv_ref


def test_ref_writes_slots():
    layers, n, hkv, bs, d, t = 2, 6, 2, 4, 8, 7
    kv_cache = torch.zeros(layers, 2, n, hkv, bs, d)
    slots = torch.randperm(n * bs)[:t]
    key, value = torch.randn(t, hkv, d), torch.randn(t, hkv, d)
    store_kv_ref(key, value, kv_cache[1][0], kv_cache[1][1], slots)
    want = torch.zeros_like(kv_cache)
    for i, slot in enumerate(slots.tolist()):
        want[1, 0, slot // bs, :, slot % bs] = key[i]
        want[1, 1, slot // bs, :, slot % bs] = value[i]
    assert torch.equal(kv_cache, want)
