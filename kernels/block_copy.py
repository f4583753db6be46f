"""Block gather/scatter between the paged KV cache and a contiguous staging buffer, and block copy from one
paged cache straight into another (for KV transfer)."""
import torch
import triton
import triton.language as tl

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
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    layers: Range = None,
    heads: Range = None,
    num_programs: int | None = None,
) -> torch.Tensor:
    """Like gather_blocks_ref, but into the given contiguous staging buffer `out`; returns out.

    num_programs (the Triton kernel): run on at most this many programs, each looping over its share of the
    blocks, so the copy leaves the rest of the GPU's SMs to kernels running beside it (NCCL's, during a KV
    transfer); None: one program per block and layer. The reference ignores it."""
    torch.index_select(_view(kv_cache, layers, heads), 2, block_ids, out=out)
    return out


def scatter_blocks_ref(
    buf: torch.Tensor,
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layers: Range = None,
    heads: Range = None,
    num_programs: int | None = None,
) -> None:
    """Inverse of gather: write buf [Le-Ls, 2, n, He-Hs, Bs, D] into blocks block_ids of kv_cache in place
    (num_programs: as for gather_blocks_into_ref)."""
    _view(kv_cache, layers, heads).index_copy_(2, block_ids, buf)


def copy_blocks_ref(
    src_cache: torch.Tensor,
    src_ids: torch.Tensor,
    dst_cache: torch.Tensor,
    dst_ids: torch.Tensor,
    layers: Range = None,
    src_heads: Range = None,
    dst_heads: Range = None,
    num_programs: int | None = None,
) -> None:
    """Write blocks src_ids of src_cache into blocks dst_ids of dst_cache (int64 [n] each, pairwise, any
    order), for these layers and heads (src_heads and dst_heads of equal length: resharding between TP ranks
    moves a head range to another offset). Caches: [L, 2, N, H, Bs, D], their N and H may differ.
    (num_programs: as for gather_blocks_into_ref.)"""
    blocks = _view(src_cache, layers, src_heads).index_select(2, src_ids)
    _view(dst_cache, layers, dst_heads).index_copy_(2, dst_ids, blocks)


# Neither the block count nor the ids' alignment is specialized on (a message of 1 block or of 16, starting
# at any block of a transfer, runs the same binary), so one warm-up per head count loads every variant a
# transfer will use (load_kernels).
@triton.jit(do_not_specialize=["num_ids", "num_items"],
            do_not_specialize_on_alignment=["ids_ptr", "num_ids", "num_items"])
def _block_copy_kernel(
    cache_ptr, buf_ptr, ids_ptr, num_ids, num_items, stride_l, stride_kv, stride_n, stride_h,
    NUM_HEADS: tl.constexpr, CHUNK: tl.constexpr, TILE_HEADS: tl.constexpr, TILE_CHUNK: tl.constexpr,
    TO_BUF: tl.constexpr,
):
    # Item i = (layer * 2 + kv) * num_ids + j moves block ids[j] of one layer's K or V: NUM_HEADS chunks of
    # CHUNK = block_size * D contiguous elements each, TILE_HEADS chunks per load. Program p moves items p,
    # p + P, p + 2P, ... (P programs: one item each, or a bounded grid that leaves SMs to other kernels).
    # cache_ptr already points at (first layer, first head).
    hh = tl.arange(0, TILE_HEADS)[:, None]
    cc = tl.arange(0, TILE_CHUNK)[None, :]
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        j = (item % num_ids).to(tl.int64)
        lkv = (item // num_ids).to(tl.int64)
        block = tl.load(ids_ptr + j)
        src = cache_ptr + (lkv // 2) * stride_l + (lkv % 2) * stride_kv + block * stride_n
        dst = buf_ptr + (lkv * num_ids + j) * NUM_HEADS * CHUNK
        for h0 in range(0, NUM_HEADS, TILE_HEADS):
            h = h0 + hh
            mask = (h < NUM_HEADS) & (cc < CHUNK)
            cache_at = src + h * stride_h + cc
            buf_at = dst + h * CHUNK + cc
            if TO_BUF:
                tl.store(buf_at, tl.load(cache_at, mask=mask), mask=mask)
            else:
                tl.store(cache_at, tl.load(buf_at, mask=mask), mask=mask)


@triton.jit(do_not_specialize=["num_ids", "num_items"],
            do_not_specialize_on_alignment=["src_ids_ptr", "dst_ids_ptr", "num_ids", "num_items"])
def _cache_copy_kernel(
    src_ptr, dst_ptr, src_ids_ptr, dst_ids_ptr, num_ids, num_items,
    s_l, s_kv, s_n, s_h, d_l, d_kv, d_n, d_h,
    NUM_HEADS: tl.constexpr, CHUNK: tl.constexpr, TILE_HEADS: tl.constexpr, TILE_CHUNK: tl.constexpr,
):
    # As _block_copy_kernel, with a paged cache on both sides: item i = (layer * 2 + kv) * num_ids + j moves
    # block src_ids[j] to block dst_ids[j]. Both pointers already point at (first layer, first head).
    hh = tl.arange(0, TILE_HEADS)[:, None]
    cc = tl.arange(0, TILE_CHUNK)[None, :]
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        j = (item % num_ids).to(tl.int64)
        lkv = (item // num_ids).to(tl.int64)
        src = src_ptr + (lkv // 2) * s_l + (lkv % 2) * s_kv + tl.load(src_ids_ptr + j) * s_n
        dst = dst_ptr + (lkv // 2) * d_l + (lkv % 2) * d_kv + tl.load(dst_ids_ptr + j) * d_n
        for h0 in range(0, NUM_HEADS, TILE_HEADS):
            h = h0 + hh
            mask = (h < NUM_HEADS) & (cc < CHUNK)
            tl.store(dst + h * d_h + cc, tl.load(src + h * s_h + cc, mask=mask), mask=mask)


_TILE_ELEMENTS = 16384  # elements one program loads at once (32 KiB of 16-bit values: a Llama block's 8 heads)


def _copy(kv_cache: torch.Tensor, block_ids: torch.Tensor, buf: torch.Tensor, layers: Range, heads: Range,
          to_buf: bool, num_programs: int | None) -> None:
    assert kv_cache.dim() == 6 and kv_cache.shape[1] == 2, "kv_cache: [L, 2, N, Hkv, Bs, D]"
    view = _view(kv_cache, layers, heads)
    num_layers, _, _, num_heads, block_size, head_dim = view.shape
    assert view.stride(-1) == 1 and view.stride(-2) == head_dim, "kv_cache: each [Bs, D] slice contiguous"
    assert block_ids.dim() == 1 and block_ids.dtype == torch.int64, "block_ids: [n] int64"
    want = (num_layers, 2, block_ids.shape[0], num_heads, block_size, head_dim)
    assert buf.shape == want and buf.is_contiguous(), f"staging buffer must be contiguous {want}"
    assert buf.dtype == kv_cache.dtype, "staging buffer dtype differs from the cache"
    assert buf.device == kv_cache.device == block_ids.device, "all tensors on one device"
    num_items = num_layers * 2 * block_ids.shape[0]
    if num_items == 0:
        return
    grid, tiles = _launch_shape(num_items, num_heads, block_size * head_dim, num_programs)
    _block_copy_kernel[(grid,)](
        view, buf, block_ids, block_ids.shape[0], num_items,
        view.stride(0), view.stride(1), view.stride(2), view.stride(3),
        **tiles, TO_BUF=to_buf, num_warps=8,
    )


def _launch_shape(num_items: int, num_heads: int, chunk: int, num_programs: int | None) -> tuple[int, dict]:
    """(grid, tile constexprs) of a block copy: one program per item, or a bounded grid looping over them."""
    tile_chunk = triton.next_power_of_2(chunk)
    tile_heads = min(triton.next_power_of_2(num_heads), max(1, _TILE_ELEMENTS // tile_chunk))
    grid = num_items if num_programs is None else max(1, min(num_items, num_programs))
    return grid, {"NUM_HEADS": num_heads, "CHUNK": chunk, "TILE_HEADS": tile_heads, "TILE_CHUNK": tile_chunk}


def gather_blocks_triton(
    kv_cache: torch.Tensor, block_ids: torch.Tensor, layers: Range = None, heads: Range = None
) -> torch.Tensor:
    """Triton gather_blocks (same contract as the ref)."""
    view = _view(kv_cache, layers, heads)
    shape = (view.shape[0], 2, block_ids.shape[0], *view.shape[3:])
    out = torch.empty(shape, dtype=kv_cache.dtype, device=kv_cache.device)
    _copy(kv_cache, block_ids, out, layers, heads, to_buf=True, num_programs=None)
    return out


def gather_blocks_into_triton(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    layers: Range = None,
    heads: Range = None,
    num_programs: int | None = None,
) -> torch.Tensor:
    """Triton gather_blocks_into (same contract as the ref)."""
    _copy(kv_cache, block_ids, out, layers, heads, to_buf=True, num_programs=num_programs)
    return out


def scatter_blocks_triton(
    buf: torch.Tensor,
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layers: Range = None,
    heads: Range = None,
    num_programs: int | None = None,
) -> None:
    """Triton scatter_blocks (same contract as the ref)."""
    _copy(kv_cache, block_ids, buf, layers, heads, to_buf=False, num_programs=num_programs)


def copy_blocks_triton(
    src_cache: torch.Tensor,
    src_ids: torch.Tensor,
    dst_cache: torch.Tensor,
    dst_ids: torch.Tensor,
    layers: Range = None,
    src_heads: Range = None,
    dst_heads: Range = None,
    num_programs: int | None = None,
) -> None:
    """Triton copy_blocks (same contract as the ref). dst_cache may live in another process (a CUDA IPC
    mapping of its memory on this GPU)."""
    assert src_cache.dim() == dst_cache.dim() == 6 and src_cache.shape[1] == dst_cache.shape[1] == 2, \
        "caches: [L, 2, N, H, Bs, D]"
    src, dst = _view(src_cache, layers, src_heads), _view(dst_cache, layers, dst_heads)
    num_layers, _, _, num_heads, block_size, head_dim = src.shape
    assert dst.shape[0] == num_layers and dst.shape[3:] == src.shape[3:], \
        f"destination {tuple(dst.shape)} does not fit source {tuple(src.shape)}"
    for view in (src, dst):
        assert view.stride(-1) == 1 and view.stride(-2) == head_dim, "caches: each [Bs, D] slice contiguous"
    assert src_ids.shape == dst_ids.shape and src_ids.dim() == 1, "src_ids, dst_ids: [n] each"
    assert src_ids.dtype == dst_ids.dtype == torch.int64, "block ids: int64"
    assert src_cache.dtype == dst_cache.dtype, "caches of one dtype"
    assert src_ids.device == dst_ids.device == src_cache.device == dst_cache.device, "all tensors on one device"
    num_items = num_layers * 2 * src_ids.shape[0]
    if num_items == 0:
        return
    grid, tiles = _launch_shape(num_items, num_heads, block_size * head_dim, num_programs)
    _cache_copy_kernel[(grid,)](
        src, dst, src_ids, dst_ids, src_ids.shape[0], num_items,
        src.stride(0), src.stride(1), src.stride(2), src.stride(3),
        dst.stride(0), dst.stride(1), dst.stride(2), dst.stride(3),
        **tiles, num_warps=8,
    )


def load_kernels(kv_cache: torch.Tensor) -> None:
    """CUDA: run the gather, the scatter and the copy once, on a scratch block shaped like `kv_cache`'s, so their
    code is loaded now. NOTE: CUDA loads a kernel's module lazily, at its first launch, and loading waits for the GPU
    to drain; a first launch while an NCCL receive waits for a peer (a KV transfer in flight) would wait as
    long as that receive, forever if the peer died."""
    if not kv_cache.is_cuda:
        return
    _, _, _, num_heads, block_size, head_dim = kv_cache.shape
    scratch = torch.zeros(1, 2, 1, num_heads, block_size, head_dim, dtype=kv_cache.dtype, device=kv_cache.device)
    ids = torch.zeros(1, dtype=torch.int64, device=kv_cache.device)
    buf = torch.empty_like(scratch)
    gather_blocks_into_triton(scratch, ids, buf)
    scatter_blocks_triton(buf, scratch, ids)
    copy_blocks_triton(scratch, ids, buf, ids)
    torch.cuda.synchronize(kv_cache.device)
