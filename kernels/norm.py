"""RMSNorm and fused residual-add + RMSNorm, numerically as Hugging Face Llama computes them."""
import torch
import triton
import triton.language as tl

from pdserve.kernels.launch import pdl_kwargs, pdl_supported


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)) over the last dim; the statistics in fp32, then cast back as HF does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); the add happens in the input dtype, as in HF."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, stride_x, stride_r, eps,
    N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    # One program per row; y and new_res are contiguous [M, N]. Rounding points follow the HF reference.
    row = tl.program_id(0).to(tl.int64)
    if PDL:
        tl.extra.cuda.gdc_wait()  # kernels/launch.py
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    dtype = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = (x + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * N + offs, x, mask=mask)
        x = x.to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * N + offs, (w * h.to(dtype).to(tl.float32)).to(dtype), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    # Any leading dims (e.g. [T, H, D] for per-head QK-norm) are rows; a non-viewable x is copied by reshape.
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    assert rows.stride(-1) == 1, "x: last dim innermost"
    assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == x.dtype, "weight: [N], x.dtype"
    assert weight.device == x.device, "all tensors on one device"
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = y
    res_rows = rows
    if residual is not None:
        assert residual.shape == x.shape, "residual: like x"
        assert residual.dtype == x.dtype and residual.device == x.device, "residual: x.dtype, same device"
        res_rows = residual.reshape(-1, n)
        assert res_rows.stride(-1) == 1, "residual: last dim innermost"
        new_res = torch.empty_like(y)
    block = triton.next_power_of_2(n)
    pdl = pdl_supported(x.device)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, res_rows, weight, y, new_res, rows.stride(0), res_rows.stride(0), eps,
        N=n, HAS_RESIDUAL=residual is not None, BLOCK_N=block, PDL=pdl, num_warps=min(16, max(1, block // 512)),
        **pdl_kwargs(pdl),
    )
    return y, new_res


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton rms_norm (same contract as the ref): x [..., N], normalized over N."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused_add_rms_norm (same contract as the ref): one read of x and residual, two writes."""
    return _launch(x, residual, weight, eps)


# ---- all-reduce fused with the residual add + RMSNorm (tensor parallelism over peer memory) ---------------


def all_reduce_add_rms_norm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a row-parallel layer's all-reduce and the add + RMSNorm after it compute: the ranks' partial
    sums (in rank order) added in fp32 and rounded once, then `fused_add_rms_norm_ref`."""
    total = torch.stack([p.float() for p in partials]).sum(0).to(residual.dtype)
    return fused_add_rms_norm_ref(total, residual, weight, eps)


@triton.jit
def _halves(words, DTYPE: tl.constexpr):
    """int32 words holding two 16-bit values each -> (low halves, high halves) as fp32."""
    lo = (words & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    hi = (words >> 16).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _words(lo, hi, DTYPE: tl.constexpr):
    """The inverse of _halves: (lo, hi) rounded to DTYPE and packed two to an int32 word."""
    lo16 = lo.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32)
    return (hi16 << 16) | lo16


@triton.jit
def fused_ll_region(slot, rank, WORLD: tl.constexpr, region_words):
    """Where, in int64 words from a fused buffer's start, the LL words that rank `rank` pushes in calls on
    `slot` begin (fused_buffer_bytes gives the layout; kernels/gemm.py pushes there too)."""
    return (slot * WORLD + rank) * region_words


@triton.jit
def fused_plain_region(slot, rank, WORLD: tl.constexpr, region_words):
    """Where, in int32 words from a fused buffer's start, the plain rows that rank `rank` pushes in calls on
    `slot` begin (fused_buffer_bytes gives the layout): what the all-reduce kernel and a GEMM that pushes
    its rows (kernels/gemm.py) both address."""
    return (4 + slot) * WORLD * region_words + rank * region_words


@triton.jit
def fused_flag(slot, program, rank, WORLD: tl.constexpr, region_words, MAX_PROGRAMS: tl.constexpr):
    """The int32 word (from a fused buffer's start) of the flag that program `program` of rank `rank` sets
    on a peer when its plain rows for a call on `slot` have been pushed."""
    return 6 * WORLD * region_words + (slot * MAX_PROGRAMS + program) * WORLD + rank


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, new_res_ptr, buf_ptrs, epochs_ptr, slot, region_words, num_rows, stride_x,
    stride_r, eps, pushed_tiles, RANK: tl.constexpr, WORLD: tl.constexpr, N: tl.constexpr,
    BLOCK: tl.constexpr, DTYPE: tl.constexpr, LL: tl.constexpr, MAX_PROGRAMS: tl.constexpr,
    PUSHED: tl.constexpr, TILES_BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    # Every tensor is seen as int32 words of two 16-bit values; a row is N // 2 words. Program p takes rows
    # p, p + P, ... on every rank.
    # (1) It pushes this rank's partial rows into every peer's buffer, region RANK. LL (small calls): each
    #     word goes as one int64 whose high half is the call's epoch, a flag travelling with the data (NCCL's
    #     "LL" protocol): stores over NVLink are posted and an 8-byte store lands whole, so there is no fence
    #     and no flag of its own, at twice the bytes. Otherwise the words go as they are, and then one flag
    #     per program and peer (the epoch, stored with release semantics after the program's stores).
    # (2) It waits, on its own buffer only, until every peer's rows (LL: every word) carry the epoch, sums
    #     the ranks' rows in rank order in fp32 (the same bits on every rank), adds the residual and
    #     normalizes as _rms_norm_kernel does.
    # PUSHED: the GEMM that produced x has already pushed its rows (kernels/gemm.py), each of its
    # `pushed_tiles` programs a column tile, as LL words or plain and followed by its flag; (1) is skipped,
    # and (2) polls the LL words as ever, or waits on all of every peer's tile flags (each row holds
    # columns of every tile).
    # The epoch: 1 + this slot's counter (epochs[slot]); program 0 moves the other slot's counter on, which
    # no program of this call reads and the next call (on the other slot) reads only once this one is done.
    # Every rank makes the same calls, so the counters agree; each call on a slot awaits a larger epoch than
    # any word an earlier call left there. The counters live on the device: a CUDA graph replays the kernel
    # as it is.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if PDL:
        tl.extra.cuda.gdc_wait()  # kernels/launch.py: x (the kernel before's output) is complete
    first = pid.to(tl.int64)
    my_rows = tl.cdiv(num_rows - pid, nprog)
    HALF: tl.constexpr = N // 2
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    epoch = tl.load(epochs_ptr + slot) + 1
    tag = epoch.to(tl.int64) << 32
    # Each buffer (see fused_buffer_bytes), in region_words R: LL regions int64 [2, WORLD, R], plain regions
    # int32 [2, WORLD, R], flags int32 [2, MAX_PROGRAMS, WORLD]; LL and plain calls never share a word.
    ll_at = fused_ll_region(slot, 0, WORLD, region_words)  # int64 words; rank r's words r * region_words on
    plain_at = fused_plain_region(slot, 0, WORLD, region_words)  # int32 words; rank r's rows r * region_words on
    flags = fused_flag(slot, pid, 0, WORLD, region_words, MAX_PROGRAMS)  # int32 words; rank r's flag r on
    for i in range(my_rows if not PUSHED else 0):
        row = first + i * nprog
        words = tl.load(x_ptr + row * stride_x + offs, mask=mask)
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                peer_buf = tl.load(buf_ptrs + peer)
                if LL:
                    packed = tag | words.to(tl.uint32, bitcast=True).to(tl.int64)
                    dst = peer_buf.to(tl.pointer_type(tl.int64)) + ll_at + RANK * region_words
                    tl.store(dst + row * HALF + offs, packed, mask=mask)
                else:
                    dst = peer_buf.to(tl.pointer_type(tl.int32)) + plain_at + RANK * region_words
                    tl.store(dst + row * HALF + offs, words, mask=mask)
    if not LL and not PUSHED:
        tl.debug_barrier()  # every thread's stores happen before the release below
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                flag = tl.load(buf_ptrs + peer).to(tl.pointer_type(tl.int32)) + flags + RANK
                tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
    w_lo, w_hi = _halves(tl.load(w_ptr + offs, mask=mask, other=0), DTYPE)
    own = tl.load(buf_ptrs + RANK)
    if PUSHED and not LL:
        # every tile's flag from every peer: polled with plain (volatile) loads until all hold the epoch, then
        # read once more by atomics with acquire semantics (adding 0), which pair with the GEMM's releases
        tiles = tl.arange(0, TILES_BLOCK)
        tile_flags = own.to(tl.pointer_type(tl.int32)) + fused_flag(slot, tiles, 0, WORLD, region_words, MAX_PROGRAMS)
        pushed = tiles < pushed_tiles
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                seen = tl.load(tile_flags + peer, mask=pushed, other=epoch, volatile=True)
                while tl.min((seen == epoch).to(tl.int32), 0) == 0:
                    seen = tl.load(tile_flags + peer, mask=pushed, other=epoch, volatile=True)
                tl.atomic_add(tile_flags + peer, 0, mask=pushed, sem="acquire", scope="sys")
        tl.debug_barrier()  # the acquires above happen before every thread's loads
    elif not LL:
        own_flags = own.to(tl.pointer_type(tl.int32)) + flags
        for peer in tl.static_range(WORLD):
            if peer != RANK:
                seen = tl.atomic_cas(own_flags + peer, epoch, epoch, sem="acquire", scope="sys")
                while seen != epoch:
                    seen = tl.atomic_cas(own_flags + peer, epoch, epoch, sem="acquire", scope="sys")
        tl.debug_barrier()  # the acquires above happen before every thread's loads
    for i in range(my_rows):
        row = first + i * nprog
        lo = tl.zeros([BLOCK], dtype=tl.float32)
        hi = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WORLD):
            if r == RANK:
                words = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0)
            elif LL:
                src = own.to(tl.pointer_type(tl.int64)) + ll_at + r * region_words + row * HALF + offs
                got = tl.load(src, mask=mask, other=tag, volatile=True)
                while tl.min(((got >> 32) == epoch).to(tl.int32), 0) == 0:
                    got = tl.load(src, mask=mask, other=tag, volatile=True)
                words = got.to(tl.int32)  # the low half: the data
            else:
                src = own.to(tl.pointer_type(tl.int32)) + plain_at + r * region_words + row * HALF + offs
                words = tl.load(src, mask=mask, other=0, volatile=True)
            a, b = _halves(words, DTYPE)
            lo += a
            hi += b
        r_lo, r_hi = _halves(tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0), DTYPE)
        lo = (lo.to(DTYPE).to(tl.float32) + r_lo).to(DTYPE).to(tl.float32)  # the sum rounded once, then added
        hi = (hi.to(DTYPE).to(tl.float32) + r_hi).to(DTYPE).to(tl.float32)
        tl.store(new_res_ptr + row * HALF + offs, _words(lo, hi, DTYPE), mask=mask)
        inv = tl.rsqrt((tl.sum(lo * lo, 0) + tl.sum(hi * hi, 0)) / N + eps)
        y_lo = w_lo * (lo * inv).to(DTYPE).to(tl.float32)
        y_hi = w_hi * (hi * inv).to(DTYPE).to(tl.float32)
        tl.store(y_ptr + row * HALF + offs, _words(y_lo, y_hi, DTYPE), mask=mask)
    if pid == 0:
        tl.store(epochs_ptr + 1 - slot, tl.load(epochs_ptr + 1 - slot) + 1)


_PACKED_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_FUSED_PROGRAMS = 256  # programs of the fused all-reduce (one row each up to this many rows)


def fused_buffer_bytes(world: int, region_words: int) -> int:
    """Bytes of each rank's buffer for all_reduce_add_rms_norm_triton, for rows of up to 4 * region_words
    bytes: per slot (2) and source rank, a region of `region_words` int64 words (LL calls) and one of
    `region_words` int32 words (the others); then int32 flags [2, MAX_FUSED_PROGRAMS, world]."""
    return 2 * world * region_words * (8 + 4) + 2 * MAX_FUSED_PROGRAMS * world * 4


def can_fuse_all_reduce(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether all_reduce_add_rms_norm_triton takes these: 16-bit [T, N] rows, N even, rows (and the
    residual's) 4-byte aligned, so each row is N // 2 whole int32 words."""
    return (x.dim() == 2 and x.dtype in _PACKED_DTYPES and residual.shape == x.shape and residual.dtype == x.dtype
            and x.shape[1] % 2 == 0 and all(t.stride(-1) == 1 and t.stride(0) % 2 == 0 and t.storage_offset() % 2 == 0
                                            for t in (x, residual)))


def all_reduce_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, buffer_ptrs: torch.Tensor,
    epochs: torch.Tensor, slot: int, region_words: int, rank: int, num_programs: int, ll: bool,
    pushed_tiles: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(sum over ranks of x + residual), sum + residual) on every rank, in one launch.

    `buffer_ptrs`: int64 [world] on x's device, the address of every rank's peer-mapped buffer, in rank order,
    laid out as `fused_buffer_bytes` says, zeroed before the first call; this call uses slot `slot` (0 or 1).
    `epochs`: int32 [2] on x's device, this rank's counter per slot, zeroed with the buffer. `ll`: rows pushed
    with their flags in every 8-byte word (less latency; twice the bytes), or followed by one flag per
    program. Every rank must make the same calls (same shapes, slots, `num_programs`, `ll`), and two calls in
    a row must not use the same slot (a peer may push the next call's rows while this rank still reads the
    previous ones). `pushed_tiles` > 0: x is the output of a GEMM that already pushed its rows into the
    peers' buffers, from that many programs, as `ll` says (`gemm.skinny_linear_push_triton`, same slot);
    the kernel then only waits for them, sums and normalizes.
    """
    assert can_fuse_all_reduce(x, residual), "x, residual: 16-bit [T, N], N even, rows of whole 4-byte words"
    n = x.shape[1]
    assert weight.shape == (n,) and weight.is_contiguous() and weight.dtype == x.dtype, "weight: [N], x.dtype"
    world = buffer_ptrs.numel()
    assert buffer_ptrs.dtype == torch.int64 and 0 <= rank < world, "addresses: int64 [world]"
    assert x.shape[0] * n // 2 <= region_words, "x does not fit a region"
    assert epochs.dtype == torch.int32 and epochs.shape == (2,) and slot in (0, 1), "a counter per slot"
    assert num_programs <= MAX_FUSED_PROGRAMS, f"at most {MAX_FUSED_PROGRAMS} programs (one flag each per slot)"
    assert 0 <= pushed_tiles <= MAX_FUSED_PROGRAMS, f"at most {MAX_FUSED_PROGRAMS} pushed tiles"
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(y)
    words = [t.view(torch.int32) for t in (x, residual, weight, y, new_res)]
    block = triton.next_power_of_2(n // 2)
    pdl = pdl_supported(x.device)
    _all_reduce_add_rms_norm_kernel[(max(1, min(num_programs, x.shape[0])),)](
        *words, buffer_ptrs, epochs, slot, region_words, x.shape[0], words[0].stride(0), words[1].stride(0), eps,
        pushed_tiles, RANK=rank, WORLD=world, N=n, BLOCK=block, DTYPE=_PACKED_DTYPES[x.dtype], LL=ll,
        MAX_PROGRAMS=MAX_FUSED_PROGRAMS, PUSHED=pushed_tiles > 0,
        TILES_BLOCK=triton.next_power_of_2(max(1, pushed_tiles)), PDL=pdl,
        num_warps=min(16, max(1, block // 256)), **pdl_kwargs(pdl),
    )
    return y, new_res
