"""Block gather/scatter: references against per-block loops, Triton against the references."""

import pytest
import torch

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import block_copy

RANGES = [(None, None), ((1, 3), None), (None, (1, 2)), ((0, 2), (2, 4))]


@pytest.mark.parametrize("layers,heads", RANGES)
def test_refs_roundtrip(layers, heads):
    kv_cache = torch.randn(3, 2, 10, 4, 4, 8)
    ids = torch.tensor([7, 2, 9, 0])
    ls, le = layers or (0, 3)
    hs, he = heads or (0, 4)
    buf = block_copy.gather_blocks_ref(kv_cache, ids, layers, heads)
    assert buf.is_contiguous()
    for j, b in enumerate(ids.tolist()):
        assert torch.equal(buf[:, :, j], kv_cache[ls:le, :, b, hs:he])
    out = torch.full_like(buf, float("nan"))
    assert torch.equal(block_copy.gather_blocks_into_ref(kv_cache, ids, out, layers, heads), buf)
    dst = torch.zeros_like(kv_cache)
    block_copy.scatter_blocks_ref(buf, dst, ids, layers, heads)
    want = torch.zeros_like(kv_cache)
    want[ls:le, :, ids, hs:he] = kv_cache[ls:le, :, ids, hs:he]
    assert torch.equal(dst, want)


def check(shape, num_ids, layers, heads, dtype, device, num_programs=None):
    kv_cache = torch.randn(shape, dtype=dtype, device=device)
    ids = torch.randperm(shape[2], device=device)[:num_ids]
    want = block_copy.gather_blocks_ref(kv_cache, ids, layers, heads)
    assert torch.equal(block_copy.gather_blocks_triton(kv_cache, ids, layers, heads), want)
    out = torch.full_like(want, float("nan"))
    assert block_copy.gather_blocks_into_triton(kv_cache, ids, out, layers, heads, num_programs) is out
    assert torch.equal(out, want)
    dst, dst_ref = torch.full_like(kv_cache, float("nan")), torch.full_like(kv_cache, float("nan"))
    block_copy.scatter_blocks_triton(want, dst, ids, layers, heads, num_programs)
    block_copy.scatter_blocks_ref(want, dst_ref, ids, layers, heads)
    assert torch.equal(dst.nan_to_num(7.0), dst_ref.nan_to_num(7.0))  # only the chosen blocks/heads written


@runs_triton
@pytest.mark.parametrize("layers,heads", RANGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton(layers, heads, dtype, poisoned):
    check((3, 2, 10, 4, 4, 8), 4, layers, heads, dtype, DEVICE)


@runs_triton
@pytest.mark.parametrize("num_programs", [1, 5, 1000])
def test_triton_bounded_grid(num_programs, poisoned):
    """Fewer programs than blocks x layers: each loops over its share (1000: more than there is work)."""
    check((3, 2, 10, 4, 4, 8), 4, (1, 3), (1, 4), torch.float16, DEVICE, num_programs)


@runs_triton
def test_triton_odd_head_count_and_chunk():
    """3 heads and block_size x head_dim = 48: both tile dimensions masked."""
    check((2, 2, 6, 3, 4, 12), 3, None, None, torch.float32, DEVICE)
    check((2, 2, 6, 3, 4, 12), 3, None, (1, 3), torch.float32, DEVICE, 2)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("layers,heads", [(None, None), ((8, 24), (2, 6))])
@pytest.mark.parametrize("num_programs", [None, 66])
def test_gpu(layers, heads, num_programs, poisoned):
    check((32, 2, 4096, 8, 16, 128), 1000, layers, heads, torch.bfloat16, DEVICE, num_programs)


def test_wrong_cache_rank_is_named():
    cache = torch.zeros(2, 10, 4, 4, 8)  # one layer's [2, N, Hkv, Bs, D], not the whole [L, 2, N, Hkv, Bs, D]
    ids = torch.tensor([1, 2])
    with pytest.raises(AssertionError, match=r"kv_cache: \[L, 2, N, Hkv, Bs, D\]"):
        block_copy.gather_blocks_into_triton(cache, ids, torch.empty(2, 2, 2, 4, 8))


@pytest.mark.gpu
@on_gpu
def test_load_kernels_leaves_the_cache_untouched():
    kv_cache = torch.randn(4, 2, 64, 8, 16, 128, dtype=torch.bfloat16, device=DEVICE)
    before = kv_cache.clone()
    block_copy.load_kernels(kv_cache)  # works on a scratch block of its own
    assert torch.equal(kv_cache, before)


COPY_RANGES = [(None, None, None), ((1, 3), (0, 2), (2, 4)), (None, (2, 3), (0, 1))]


def test_copy_ref_moves_only_the_chosen_blocks_and_heads():
    src, dst = torch.randn(3, 2, 10, 4, 4, 8), torch.zeros(3, 2, 6, 2, 4, 8)
    src_ids, dst_ids = torch.tensor([7, 2, 9]), torch.tensor([5, 0, 3])
    block_copy.copy_blocks_ref(src, src_ids, dst, dst_ids, (1, 3), (2, 4), (0, 2))
    want = torch.zeros_like(dst)
    for s, d in zip(src_ids.tolist(), dst_ids.tolist(), strict=True):
        want[1:3, :, d] = src[1:3, :, s, 2:4]
    assert torch.equal(dst, want)


@runs_triton
@pytest.mark.parametrize("layers,src_heads,dst_heads", COPY_RANGES)
@pytest.mark.parametrize("num_programs", [None, 3])
def test_copy_triton(layers, src_heads, dst_heads, num_programs, poisoned):
    src = torch.randn(3, 2, 10, 4, 4, 8, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.full((3, 2, 7, 4, 4, 8), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    dst_ref = dst.clone()
    src_ids = torch.tensor([9, 1, 4, 6], device=DEVICE)
    dst_ids = torch.tensor([2, 6, 0, 3], device=DEVICE)
    block_copy.copy_blocks_triton(src, src_ids, dst, dst_ids, layers, src_heads, dst_heads, num_programs)
    block_copy.copy_blocks_ref(src, src_ids, dst_ref, dst_ids, layers, src_heads, dst_heads)
    assert torch.equal(dst.nan_to_num(7.0), dst_ref.nan_to_num(7.0))
