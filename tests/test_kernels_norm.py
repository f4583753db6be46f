"""RMSNorm and fused add + RMSNorm: references against Hugging Face Llama, Triton against the references."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from kernel_support import DEVICE, on_gpu, runs_triton
from pdserve.kernels import gemm, norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_refs_match_hf(dtype):
    hf = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    hf.weight.data = torch.randn(48, dtype=dtype)
    x, res = torch.randn(7, 48, dtype=dtype), torch.randn(7, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(norm.rms_norm_ref(x, hf.weight, 1e-6), hf(x))
        y, new_res = norm.fused_add_rms_norm_ref(x, res, hf.weight, 1e-6)
        assert torch.equal(new_res, x + res)
        assert torch.equal(y, hf(x + res))


def check(shape, dtype, device):
    """Triton against the ref; a strided x (a slice of a wider tensor) and a 3-d x (per-head QK-norm)."""
    n = shape[-1]
    x = torch.randn(*shape[:-1], 2 * n, dtype=dtype, device=device)[..., :n]
    res = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device)
    # One ulp of the output dtype: the row sum's order differs from torch's.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    close = {"atol": tol, "rtol": tol}
    torch.testing.assert_close(norm.rms_norm_triton(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), **close)
    y, new_res = norm.fused_add_rms_norm_triton(x, res, w, 1e-6)
    want_y, want_res = norm.fused_add_rms_norm_ref(x, res, w, 1e-6)
    torch.testing.assert_close(y, want_y, **close)
    # The sum is exact on GPU; the interpreter truncates fp32 -> bf16 instead of rounding to nearest.
    res_tol = 2**-7 if device == "cpu" and dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(new_res, want_res, atol=res_tol, rtol=res_tol)


@runs_triton
@pytest.mark.parametrize("shape", [(5, 48), (3, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton(shape, dtype, poisoned):
    check(shape, dtype, DEVICE)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (333, 8192), (1024, 32, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu(shape, dtype, poisoned):
    check(shape, dtype, DEVICE)


def test_ops_uses_the_reference_on_cpu():
    from pdserve.kernels import ops

    x, w = torch.randn(3, 16), torch.randn(16)
    assert ops.rms_norm.__doc__ == norm.rms_norm_ref.__doc__
    assert torch.equal(ops.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6))


def test_all_reduce_ref_is_the_sum_then_the_fused_norm():
    parts = [torch.randn(3, 16, dtype=torch.bfloat16) for _ in range(2)]
    res, w = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    y, new_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-6)
    want = norm.fused_add_rms_norm_ref((parts[0].float() + parts[1].float()).bfloat16(), res, w, 1e-6)
    assert torch.equal(y, want[0]) and torch.equal(new_res, want[1])


def ll_words(rows: torch.Tensor, epoch: int) -> torch.Tensor:
    """16-bit rows as the fused kernel pushes them in LL calls: int64 words, two elements low, the epoch high."""
    data = rows.contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
    return data | (epoch << 32)


class FusedBuffer:
    """One rank's buffer for the fused all-reduce, with views of its parts (norm.fused_buffer_bytes)."""

    def __init__(self, world: int, region: int, fill: int, device):
        self.words = torch.full((norm.fused_buffer_bytes(world, region) // 8,), fill, dtype=torch.int64,
                                device=device)
        n32 = self.words.view(torch.int32)
        self.ll = self.words[:2 * world * region].view(2, world, region)
        self.plain = n32[4 * world * region:6 * world * region].view(2, world, region)
        self.flags = n32[6 * world * region:].view(2, norm.MAX_FUSED_PROGRAMS, world)


def one_rank_of(world, rank, rows, n, programs, dtype, device, epoch, slot, ll):
    """Run the fused all-reduce kernel as rank `rank` of `world` with the other ranks already through their
    half (their rows, LL-tagged or plain + flags, in this rank's buffer with the epoch it awaits), so it
    runs alone. Every other word holds the previous epoch."""
    region = rows * n // 2 + 4
    parts = [torch.randn(rows, n, dtype=dtype, device=device) for _ in range(world)]
    x_wide = torch.randn(rows, 2 * n, dtype=dtype, device=device)
    x_wide[:, :n] = parts[rank]
    x = x_wide[:, :n]  # strided, as a slice of a wider output would be
    res = torch.randn(rows, n, dtype=dtype, device=device)
    w = torch.randn(n, dtype=dtype, device=device)
    stale = (epoch - 1) << 32 | (epoch - 1)  # as LL words and as flags: the previous epoch
    buffers = [FusedBuffer(world, region, stale, device) for _ in range(world)]
    own = buffers[rank]
    for r in range(world):
        if r != rank and ll:
            own.ll[slot, r, :rows * n // 2] = ll_words(parts[r], epoch)
        elif r != rank:
            own.plain[slot, r, :rows * n // 2] = parts[r].view(torch.int32).flatten()
            own.flags[slot, :min(programs, rows), r] = epoch
    epochs = torch.tensor([epoch - 1, 7] if slot == 0 else [7, epoch - 1], dtype=torch.int32, device=device)
    ptrs = torch.tensor([b.words.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    y, new_res = norm.all_reduce_add_rms_norm_triton(
        x, res, w, 1e-6, buffer_ptrs=ptrs, epochs=epochs, slot=slot, region_words=region, rank=rank,
        num_programs=programs, ll=ll)
    return parts, res, w, buffers, epochs, y, new_res, stale


@runs_triton
@pytest.mark.parametrize("world,rank,rows,programs,slot", [(2, 0, 5, 8, 0), (2, 1, 6, 4, 1), (4, 2, 3, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ll", [True, False])
def test_all_reduce_add_rms_norm_one_rank(world, rank, rows, programs, slot, dtype, ll):
    epoch, n = 3, 48
    parts, res, w, buffers, epochs, y, new_res, stale = one_rank_of(
        world, rank, rows, n, programs, dtype, DEVICE, epoch, slot, ll)
    want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-6)
    # on the interpreter its fp32 -> 16-bit casts truncate where the reference rounds, twice before the norm
    # (the sum, then the residual add), which |weight| amplifies: up to a few ulps of y.
    tol = 4e-2 if DEVICE == "cpu" else 1.6e-2
    torch.testing.assert_close(y, want_y, atol=tol, rtol=tol)
    res_tol = 2**-6 if DEVICE == "cpu" else 0.0  # one ulp per rounding on the interpreter; exact on a GPU
    torch.testing.assert_close(new_res, want_res, atol=res_tol, rtol=res_tol)
    words, used = rows * n // 2, min(programs, rows)
    for r in range(world):
        if r == rank:
            continue
        # this rank's rows pushed into region `rank` of every peer's buffer, and nothing else touched
        peer, want = buffers[r], FusedBuffer(world, words + 4, stale, DEVICE)
        if ll:
            want.ll[slot, rank, :words] = ll_words(parts[rank], epoch)
        else:
            want.plain[slot, rank, :words] = parts[rank].view(torch.int32).flatten()
            want.flags[slot, :used, rank] = epoch  # one flag per program that ran, after its rows
        assert torch.equal(peer.words, want.words)
    # this slot's counter left for the next call on it to read; the other slot's moved on
    assert epochs.tolist() == ([epoch - 1, 8] if slot == 0 else [8, epoch - 1])


def test_can_fuse_all_reduce_needs_whole_16_bit_words():
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert norm.can_fuse_all_reduce(x, x)
    assert not norm.can_fuse_all_reduce(x.float(), x.float())  # 32-bit: the unfused path
    assert not norm.can_fuse_all_reduce(x[:, :7], x[:, :7])  # odd row length
    odd = torch.zeros(4, 9, dtype=torch.bfloat16)[:, 1:]  # rows start mid-word
    assert not norm.can_fuse_all_reduce(odd, odd)


@runs_triton
@pytest.mark.parametrize("world,rows,n,slot,cols", [(2, 5, 48, 0, 0), (3, 3, 64, 1, 0), (2, 5, 48, 1, 10)])
@pytest.mark.parametrize("ll", [True, False])
def test_gemm_pushed_rows_then_the_all_reduce(world, rows, n, slot, cols, ll):
    """Every rank of a gang on one device: each rank's row-parallel GEMM pushes its column tiles into the
    peers' buffers (LL words, or plain with a flag per tile), then each rank's all-reduce only waits, sums
    and normalizes."""
    epoch, k = 5, 32
    dtype = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the interpreter's tl.dot has no bf16
    config = gemm.SkinnyConfig(16, 16, 1, 4, 1, cols=cols)  # cols 10: 5 programs of 10 columns
    tiles = -(-n // config.columns)
    region = rows * n // 2 + 4
    stale = (epoch - 1) << 32 | (epoch - 1)
    buffers = [FusedBuffer(world, region, stale, DEVICE) for _ in range(world)]
    ptrs = torch.tensor([b.words.data_ptr() for b in buffers], dtype=torch.int64, device=DEVICE)
    epochs = [torch.tensor([epoch - 1, 9] if slot == 0 else [9, epoch - 1], dtype=torch.int32, device=DEVICE)
              for _ in range(world)]
    xs = [torch.randn(rows, k, dtype=dtype, device=DEVICE) for _ in range(world)]
    ws = [torch.randn(n, k, dtype=dtype, device=DEVICE) / 4 for _ in range(world)]
    res = torch.randn(rows, n, dtype=dtype, device=DEVICE)
    norm_w = torch.randn(n, dtype=dtype, device=DEVICE)
    parts = []
    for r in range(world):
        y, got_tiles = gemm.skinny_linear_push_triton(xs[r], ws[r], config, buffer_ptrs=ptrs, epochs=epochs[r],
                                                      slot=slot, region_words=region, rank=r, ll=ll)
        assert got_tiles == tiles
        torch.testing.assert_close(y, gemm.linear_ref(xs[r], ws[r]), atol=5e-2, rtol=2e-2)
        parts.append(y)
    words = rows * n // 2
    for r in range(world):
        want = FusedBuffer(world, region, stale, DEVICE)  # what every peer pushed here, and nothing else
        for peer in range(world):
            if peer != r and ll:
                want.ll[slot, peer, :words] = ll_words(parts[peer], epoch)
            elif peer != r:
                want.plain[slot, peer, :words] = parts[peer].view(torch.int32).flatten()
                want.flags[slot, :tiles, peer] = epoch
        assert torch.equal(buffers[r].words, want.words)
    outs = [norm.all_reduce_add_rms_norm_triton(
        parts[r], res, norm_w, 1e-6, buffer_ptrs=ptrs, epochs=epochs[r], slot=slot, region_words=region, rank=r,
        num_programs=4, ll=ll, pushed_tiles=tiles) for r in range(world)]
    for y, new_res in outs[1:]:  # the same bits on every rank
        assert torch.equal(y, outs[0][0]) and torch.equal(new_res, outs[0][1])
    want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, norm_w, 1e-6)
    tol = 4e-2 if DEVICE == "cpu" else 1.6e-2
    torch.testing.assert_close(outs[0][0], want_y, atol=tol, rtol=tol)
    res_tol = 2**-6 if DEVICE == "cpu" else 0.0
    torch.testing.assert_close(outs[0][1], want_res, atol=res_tol, rtol=res_tol)
    for e in epochs:  # as after an all-reduce that pushed its own rows
        assert e.tolist() == ([epoch - 1, 10] if slot == 0 else [10, epoch - 1])


def test_a_pushing_gemm_refuses_what_it_cannot_push():
    x = torch.zeros(2, 8, dtype=torch.bfloat16)
    ptrs, epochs = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    with pytest.raises(AssertionError, match="at most 256 pushed tiles"):
        norm.all_reduce_add_rms_norm_triton(x, x, x[0], 1e-6, buffer_ptrs=ptrs, epochs=epochs, slot=0, region_words=64,
                                            rank=0, num_programs=2, ll=True, pushed_tiles=257)
    with pytest.raises(AssertionError, match="no split K"):
        gemm.skinny_linear_push_triton(x, x, gemm.SkinnyConfig(16, 16, 2), buffer_ptrs=ptrs, epochs=epochs, slot=0,
                                       region_words=64, rank=0)
    with pytest.raises(AssertionError, match="LL words hold two values"):
        gemm.skinny_linear_push_triton(x, x, gemm.SkinnyConfig(15, 16, 1), buffer_ptrs=ptrs, epochs=epochs, slot=0,
                                       region_words=64, rank=0, ll=True)


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("ll", [True, False])
def test_gemm_pushed_rows_replayed_from_a_graph(ll):
    """A gang of two simulated on one GPU runs four pushed calls (slots alternating) eagerly, then the same
    calls captured in a CUDA graph and replayed: the epochs live on the device, so every replay awaits
    fresh words and flags and gives the eager bits."""
    world, rows, n, k = 2, 64, 4096, 2048
    region = rows * n // 2
    buffers = [torch.zeros(norm.fused_buffer_bytes(world, region) // 8, dtype=torch.int64, device="cuda")
               for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda")
    epochs = [torch.zeros(2, dtype=torch.int32, device="cuda") for _ in range(world)]
    gen = torch.Generator(device="cuda").manual_seed(3)
    calls = [([torch.randn(rows, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(world)],
              [torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(world)],
              torch.randn(rows, n, generator=gen, device="cuda", dtype=torch.bfloat16),
              torch.randn(n, generator=gen, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
    config = gemm.push_config(calls[0][0][0], calls[0][1][0])

    def run():
        out = []
        for c, (xs, ws, res, w) in enumerate(calls):
            pushed = [gemm.skinny_linear_push_triton(xs[r], ws[r], config, buffer_ptrs=ptrs, epochs=epochs[r],
                                                     slot=c % 2, region_words=region, rank=r, ll=ll)
                      for r in range(world)]
            out.append([norm.all_reduce_add_rms_norm_triton(
                y, res, w, 1e-5, buffer_ptrs=ptrs, epochs=epochs[r], slot=c % 2, region_words=region, rank=r,
                num_programs=norm.MAX_FUSED_PROGRAMS, ll=ll, pushed_tiles=tiles)
                for r, (y, tiles) in enumerate(pushed)])
        return out

    eager = run()
    for (xs, ws, res, w), ranks in zip(calls, eager):
        parts = [gemm.skinny_linear_triton(xs[r], ws[r], config) for r in range(world)]
        want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-5)
        for y, new_res in ranks:
            assert torch.equal(new_res, want_res) and torch.equal(y, ranks[0][0])
            torch.testing.assert_close(y, want_y, atol=1.6e-2, rtol=1.6e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for ranks, ranks0 in zip(replayed, eager):
            for (y, new_res), (y0, res0) in zip(ranks, ranks0):
                assert torch.equal(y, y0) and torch.equal(new_res, res0)
