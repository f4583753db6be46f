"""Kernel benchmark: each Triton kernel's achieved bandwidth (or FLOP/s) as a fraction of this GPU's ceilings,
and its time against PyTorch's own op on the same data, all measured in one run.

    python -m pdserve.bench.kernels --out kernels.json [--sweep] [--only decode prefill elementwise]
                                    [--heads 16/4]    # one TP=2 rank's attention heads (query/kv)

Ceilings: a large device-to-device copy (bytes read + written) and a bf16 8192^3 GEMM, on random data.
Times are `triton.testing.do_bench` medians (it flushes L2 between runs). --sweep also times tile configs.
"""

import argparse
import itertools
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

from pdserve.kernels import activation, attention_decode, attention_prefill, block_copy, kv_store, norm, rope

DT = torch.bfloat16
HQ, HKV, D, BS = 32, 8, 128, 16  # Llama-3-8B attention shape, block_size 16
MAX_KV_BYTES = 24 << 30  # skip decode shapes whose paged K/V (plus its contiguous copy) would not fit well


def ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of fn(*args, **kwargs)."""
    return do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=100, return_mode="median")


def graph_us(body, calls: int, replays: int = 20, reset=None) -> float:
    """Median µs per op of `body` (which makes `calls` ops) captured once into a CUDA graph and replayed;
    `reset`, if given, restores the inputs before each replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    times = []
    for _ in range(replays):
        if reset is not None:
            reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def ceilings() -> dict:
    src = torch.randn(1 << 30, dtype=DT, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * src.element_size() / (ms(lambda: dst.copy_(src)) * 1e-3)
    a, b = torch.randn(8192, 8192, dtype=DT, device="cuda"), torch.randn(8192, 8192, dtype=DT, device="cuda")
    gemm = 2 * 8192**3 / (ms(lambda: a @ b) * 1e-3)
    return {"copy_bytes_per_s": copy_bw, "gemm_bf16_flop_per_s": gemm}


def row(name, shape, t, t_torch, amount, ceiling, unit) -> dict:
    """amount: bytes or FLOPs moved/done by one call; ceiling in the same unit per second."""
    rate = amount / (t * 1e-3)
    return {
        "kernel": name,
        "shape": shape,
        "ms": t,
        "torch_ms": t_torch,
        unit: rate,
        "of_ceiling": rate / ceiling,
        "speedup_vs_torch": t_torch / t,
    }


def paged_kv(batch: int, ctx: int):
    """Random paged K/V of `batch` sequences x `ctx` tokens in shuffled blocks; the same K/V contiguous."""
    per_seq = ctx // BS
    k_cache = torch.randn(batch * per_seq, HKV, BS, D, dtype=DT, device="cuda")
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()

    def contiguous(cache):  # [B, Hkv, ctx, D]
        return cache[tables.long()].permute(0, 2, 1, 3, 4).reshape(batch, HKV, ctx, D)

    return k_cache, v_cache, tables, contiguous(k_cache), contiguous(v_cache)


def decode_case(batch, ctx, ceil, configs=(None,), splits=(None,)):
    k_cache, v_cache, tables, k, v = paged_kv(batch, ctx)
    q = torch.randn(batch, HQ, D, dtype=DT, device="cuda")
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    t_torch = ms(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=D**-0.5, enable_gqa=True))
    amount = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    rows = []
    for cfg, ns in itertools.product(configs, splits):
        def call(cfg=cfg, ns=ns):
            return attention_decode.paged_decode_attention_triton(
                q, k_cache, v_cache, tables, lens, D**-0.5, num_splits=ns, config=cfg)

        try:
            t = ms(call)
            # as the engine runs it (replayed from a graph: no launch cost on the host, which do_bench's
            # median includes and which is most of a small case's time)
            t_graph = graph_us(lambda call=call: [call() for _ in range(8)], 8) / 1e3
        except OutOfResources as e:  # a tile config past the shared-memory limit: skip it
            print(f"  decode {cfg} splits={ns}: {type(e).__name__}", file=sys.stderr)
            continue
        r = row(
            "decode_attention",
            f"B{batch} ctx{ctx}",
            t,
            t_torch,
            amount,
            ceil["copy_bytes_per_s"],
            "bytes_per_s",
        )
        rows.append({**r, "config": cfg, "num_splits": ns, "graph_ms": t_graph,
                     "graph_of_ceiling": amount / (t_graph * 1e-3) / ceil["copy_bytes_per_s"]})
    return rows


def prefill_inputs(batch: int, seq: int):
    """A full prefill of `batch` sequences of `seq` tokens as the engine hands it over: q, k, v strided views of
    one fused qkv output, k/v also stored in shuffled cache blocks. Returns the kernel's arguments up to
    `scale` and the same q/k/v as SDPA takes them ([B, H, L, D] views of contiguous [B, L, H, D])."""
    per_seq = seq // BS
    t = batch * seq
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, dtype=DT, device="cuda")
    q, k, v = (x.view(t, -1, D) for x in qkv.split([HQ * D, HKV * D, HKV * D], 1))
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
    k_cache = torch.empty(batch * per_seq, HKV, BS, D, dtype=DT, device="cuda")
    v_cache = torch.empty_like(k_cache)
    for cache, x in ((k_cache, k), (v_cache, v)):  # token i of sequence b -> block tables[b, i // BS], slot i % BS
        cache[tables.long()] = x.reshape(batch, per_seq, BS, HKV, D).transpose(2, 3)
    qsl = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * seq
    lens = torch.full((batch,), seq, dtype=torch.int32, device="cuda")
    sdpa = tuple(x.contiguous().view(batch, seq, -1, D).transpose(1, 2) for x in (q, k, v))
    return (q, k, v, k_cache, v_cache, tables, qsl, lens), sdpa


def prefill_case(batch, seq, ceil, configs=(None,)):
    args, (qb, kb, vb) = prefill_inputs(batch, seq)
    t_torch = ms(
        lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=D**-0.5, enable_gqa=True)
    )
    flops = 4 * batch * seq * seq // 2 * D * HQ  # QK^T and PV over the causal half
    rows = []
    for cfg in configs:
        try:
            t = ms(attention_prefill.paged_prefill_attention_triton, *args, D**-0.5, config=cfg)
        except OutOfResources as e:
            print(f"  prefill {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        r = row(
            "prefill_attention",
            f"{batch}x{seq}",
            t,
            t_torch,
            flops,
            ceil["gemm_bf16_flop_per_s"],
            "flop_per_s",
        )
        rows.append({**r, "config": cfg})
    return rows


def _token_cases(tokens: int, bw: float) -> list[dict]:
    """Norms, RoPE, SiLU-and-mul and the KV store over `tokens` tokens (the store: twice as many)."""
    rows, h = [], 4096
    x, res = torch.randn(tokens, h, dtype=DT, device="cuda"), torch.randn(tokens, h, dtype=DT, device="cuda")
    w = torch.randn(h, dtype=DT, device="cuda")
    t = ms(lambda: norm.fused_add_rms_norm_triton(x, res, w, 1e-6))
    t_torch = ms(lambda: F.rms_norm(x + res, (h,), w, 1e-6))
    rows.append(row("fused_add_rms_norm", f"{tokens}x{h}", t, t_torch, 4 * x.numel() * 2, bw, "bytes_per_s"))
    t, t_torch = ms(lambda: norm.rms_norm_triton(x, w, 1e-6)), ms(lambda: F.rms_norm(x, (h,), w, 1e-6))
    rows.append(row("rms_norm", f"{tokens}x{h}", t, t_torch, 2 * x.numel() * 2, bw, "bytes_per_s"))

    cache = rope.build_cos_sin_cache(D, 8192, 500000.0, None).cuda()
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    q, k = torch.randn(tokens, HQ, D, dtype=DT, device="cuda"), torch.randn(tokens, HKV, D, dtype=DT, device="cuda")
    amount = 2 * (q.numel() + k.numel()) * 2 + tokens * D * 4
    t, t_torch = ms(lambda: rope.rope_triton(q, k, pos, cache)), ms(lambda: rope.rope_ref(q, k, pos, cache))
    rows.append(row("rope", f"T{tokens} 32q/8kv", t, t_torch, amount, bw, "bytes_per_s"))

    gu = torch.randn(tokens, 2 * 14336, dtype=DT, device="cuda")
    t, t_torch = ms(lambda: activation.silu_and_mul_triton(gu)), ms(lambda: activation.silu_and_mul_ref(gu))
    rows.append(row("silu_and_mul", f"{tokens}x14336", t, t_torch, gu.numel() * 2 * 3 // 2, bw, "bytes_per_s"))

    n = 2 * tokens
    kv = torch.randn(n, 2, HKV, D, dtype=DT, device="cuda")
    caches = torch.randn(2, n, HKV, BS, D, dtype=DT, device="cuda")
    slots = torch.randperm(n * BS, device="cuda")[:n]
    args = (kv[:, 0], kv[:, 1], caches[0], caches[1], slots)
    t, t_torch = ms(lambda: kv_store.store_kv_triton(*args)), ms(lambda: kv_store.store_kv_ref(*args))
    rows.append(row("store_kv", f"T{n}", t, t_torch, 2 * kv.numel() * 2, bw, "bytes_per_s"))
    return rows


def elementwise_cases(ceil) -> list[dict]:
    """Each bandwidth kernel at a decode-to-small-prefill size (4096 tokens: tens of µs, where launch and
    tail costs weigh) and at a size that keeps the GPU busy longer (32768 tokens, a long prefill chunk);
    then the block gather/scatter of KV transfer."""
    bw = ceil["copy_bytes_per_s"]
    rows = []
    for tokens in (4096, 32768):
        rows += _token_cases(tokens, bw)

    kv_cache = torch.randn(32, 2, 4096, HKV, BS, D, dtype=DT, device="cuda")  # 8 GiB
    ids = torch.randperm(4096, device="cuda")[:1024]
    for layers, heads in [(None, None), ((0, 16), (0, 4))]:
        shape = f"1024 blocks L{layers or 'all'} H{heads or 'all'}"
        buf = block_copy.gather_blocks_ref(kv_cache, ids, layers, heads)
        amount = 2 * buf.numel() * 2
        t = ms(block_copy.gather_blocks_into_triton, kv_cache, ids, buf, layers, heads)
        t_torch = ms(block_copy.gather_blocks_into_ref, kv_cache, ids, buf, layers, heads)
        rows.append(row("gather_blocks_into", shape, t, t_torch, amount, bw, "bytes_per_s"))
        t = ms(block_copy.scatter_blocks_triton, buf, kv_cache, ids, layers, heads)
        t_torch = ms(block_copy.scatter_blocks_ref, buf, kv_cache, ids, layers, heads)
        rows.append(row("scatter_blocks", shape, t, t_torch, amount, bw, "bytes_per_s"))
    return rows


def decode_configs() -> list[dict]:
    return [{"BLOCK_N": n, "num_warps": w, "num_stages": s}
            for n, w, s in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]


def sweeps(ceil):
    """Tile configs for the two attention kernels, and split counts around the automatic choice."""
    dec = decode_configs()
    pre = [
        {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
        for m, n, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
        if m % n == 0  # the kernel's key tiles must divide its row tiles
    ]
    for batch, ctx in [(64, 4096), (1, 32768), (16, 4096)]:
        yield "decode", lambda b=batch, c=ctx: decode_case(b, c, ceil, dec)
    for batch, ctx in [(64, 4096), (1, 32768), (16, 4096), (256, 512), (64, 1024)]:
        n = attention_decode.choose_num_splits(batch, HKV, ctx, torch.device("cuda"))
        yield "decode", lambda b=batch, c=ctx, n=n: decode_case(
            b, c, ceil, splits=sorted({max(1, n // 2), n, 2 * n, 4 * n})
        )
    for batch, seq in [(8, 2048), (1, 16384)]:
        yield "prefill", lambda b=batch, s=seq: prefill_case(b, s, ceil, pre)


FAMILIES = ["decode", "prefill", "elementwise"]


def cases(ceil):
    """The table: every case as (family, thunk returning rows)."""
    for batch, ctx in itertools.product((1, 16, 64, 256), (512, 4096, 32768)):
        if 2 * batch * ctx * HKV * D * 2 <= MAX_KV_BYTES:
            yield "decode", lambda b=batch, c=ctx: decode_case(b, c, ceil)
    yield "prefill", lambda: prefill_case(8, 2048, ceil) + prefill_case(1, 16384, ceil)
    yield "elementwise", lambda: elementwise_cases(ceil)


def main() -> int:
    global HQ, HKV  # --heads
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write all rows and ceilings as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also time tile configs and split counts")
    parser.add_argument(
        "--only", nargs="+", choices=FAMILIES, default=FAMILIES, help="run only these kernel families"
    )
    parser.add_argument("--heads", default=f"{HQ}/{HKV}", help="query/kv heads of the attention cases")
    parser.add_argument("--decode-sweep", default=None, metavar="BxCTX",
                        help="only decode attention at this batch and context: every tile config at 1, 2, 4 splits")
    args = parser.parse_args()
    HQ, HKV = (int(h) for h in args.heads.split("/"))
    if not torch.cuda.is_available():
        print(
            "pdserve.bench.kernels needs a CUDA GPU (the Triton kernels are the GPU fast path).",
            file=sys.stderr,
        )
        return 2
    torch.manual_seed(0)
    ceil = ceilings()
    print(
        f"{torch.cuda.get_device_name()}  copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s  "
        f"bf16 GEMM {ceil['gemm_bf16_flop_per_s'] / 1e12:.0f} TFLOP/s"
    )
    print(
        f"{'kernel':<20} {'shape':<28} {'ms':>9} {'torch ms':>9} {'of ceil':>8} {'vs torch':>9}"
        "  config splits"
    )
    rows = []
    thunks = itertools.chain(cases(ceil), sweeps(ceil) if args.sweep else ())
    if args.decode_sweep:
        batch, ctx = (int(v) for v in args.decode_sweep.split("x"))
        thunks = [("decode", lambda: decode_case(batch, ctx, ceil, [None, *decode_configs()], splits=(1, 2, 4)))]
    for family, thunk in thunks:
        if family not in args.only:
            continue
        try:
            new = thunk()
        except Exception as e:  # noqa: BLE001 -- one failing case must not hide the other cases' numbers
            print(f"  case failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for r in new:
            print(
                f"{r['kernel']:<20} {r['shape']:<28} {r['ms']:9.4f} {r['torch_ms']:9.4f} "
                f"{r['of_ceiling']:8.3f} "
                f"{r['speedup_vs_torch']:8.2f}x  {r.get('config') or ''} {r.get('num_splits') or ''}"
                + (f"  graph {r['graph_ms']:.4f} ms ({r['graph_of_ceiling']:.3f})" if "graph_ms" in r else "")
            )
        rows += new
        torch.cuda.empty_cache()
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "ceilings": ceil, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
