"""Block gather/scatter between the paged KV cache and a contiguous staging buffer (for KV transfer)."""
import torch

Range = tuple[int, int] | None


def _view(kv_cache: torch.Tensor, layers: Range, heads: Range) -> torch.Tensor:
    # kv_cache: [L, 2, N, Hkv, Bs, D] -> [Le-Ls, 2, N, He-Hs, Bs, D] (a view)
    ls, le = layers if layers is not None else (0, kv_cache.shape[0])
    hs, he = heads if heads is not None else (0, kv_cache.shape[3])
    return kv_cache[ls:le, :, :, hs:he]


def gather_blocks_ref(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layers: Range = None, heads: Range = None
) -> torch.Tensor:
    """Return a new contiguous [Le-Ls, 2, n, He-Hs, Bs, D] holding blocks block_ids (int64 [n], any order)."""
    return _view(kv_cache, layers, heads).index_select(2, block_ids)


def gather_blocks_into_ref(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, out: torch.Tensor, layers: Range = None, heads: Range = None
) -> torch.Tensor:
    """Like gather_blocks_ref, but into the given contiguous staging buffer `out`; returns out."""
    torch.index_select(_view(kv_cache, layers, heads), 2, block_ids, out=out)
    return out


def scatter_blocks_ref(
    buf: torch.Tensor, kv_cache: torch.Tensor, block_ids: torch.Tensor, layers: Range = None, heads: Range = None
) -> None:
    """Inverse of gather: write buf [Le-Ls, 2, n, He-Hs, Bs, D] into blocks block_ids of kv_cache, in place."""
    _view(kv_cache, layers, heads).index_copy_(2, block_ids, buf)
