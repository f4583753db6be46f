"""Block gather/scatter: references against per-block loops."""
import pytest
import torch
from pdserve.kernels.block_copy import gather_blocks_into_ref, gather_blocks_ref, scatter_blocks_ref


@pytest.mark.parametrize("layers,heads", [(None, None), ((1, 3), None), (None, (1, 2)), ((0, 2), (2, 4))])
def test_refs_roundtrip(layers, heads):
    kv_cache = torch.randn(3, 2, 10, 4, 4, 8)
    ids = torch.tensor([7, 2, 9, 0])
    ls, le = layers or (0, 3)
    hs, he = heads or (0, 4)
    buf = gather_blocks_ref(kv_cache, ids, layers, heads)
    assert buf.is_contiguous()
    for j, b in enumerate(ids.tolist()):
        assert torch.equal(buf[:, :, j], kv_cache[ls:le, :, b, hs:he])
    out = torch.full_like(buf, float("nan"))
    assert torch.equal(gather_blocks_into_ref(kv_cache, ids, out, layers, heads), buf)
    dst = torch.zeros_like(kv_cache)
    scatter_blocks_ref(buf, dst, ids, layers, heads)
    want = torch.zeros_like(kv_cache)
    want[ls:le, :, ids, hs:he] = kv_cache[ls:le, :, ids, hs:he]
    assert torch.equal(dst, want)
