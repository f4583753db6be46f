"""Decode GEMMs: cuBLAS against the skinny kernel (kernels/gemm.py), in CUDA graphs, per weight shape.

    python tools/gemm.py [--shapes tp1,tp2] [--layers 32] [--out DIR]
    python tools/gemm.py --push [--out DIR]     # the row-parallel GEMMs that push their rows
    python tools/gemm.py --gated [--out DIR]    # gate/up with SiLU-and-mul in its epilogue, or not

The shapes are Llama-3-8B's projections as one rank holds them at TP=1 and TP=2 ([N, K] weights, bf16).
Each candidate config is timed at 64 rows in a graph over enough weight copies that nothing stays in L2
(each call's predecessor is the call before: where the GPU has programmatic dependent launch, the skinny
kernel's start overlaps it); the best one is then timed at 1 and 16 rows, and at 64 without PDL. A shape
earns a SKINNY_CONFIGS entry (printed last) when its best config beats cuBLAS at every row count, by 3% at
64; bytes moved = the weight, read once.

Then the layer chain: `--layers` layers of the four projections in order (qkv, o, gate_up, down; each
layer its own weights, 64 rows), µs per layer for cuBLAS throughout, for what the engine runs now
(`ops.linear`: the table's entries), and for the skinny kernel's best config of every shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from pdserve.bench import kernels as kernel_bench
from pdserve.kernels import gemm

SHAPES = {
    "tp1": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "tp2": {"qkv": (3072, 4096), "o": (4096, 2048), "gate_up": (14336, 4096), "down": (4096, 7168)},
}
CANDIDATES = [gemm.SkinnyConfig(bn, 128, split, 4, stages)
              for bn, split, stages in itertools.product((16, 32, 64, 128), (1, 2, 4), (4, 6))]
PUSH_CANDIDATES = [c for c in CANDIDATES if c.split == 1 and c.block_n <= 64]


def wave_configs(n: int, gated: bool = False, splits=(1, 2)) -> list[gemm.SkinnyConfig]:
    """Configs whose grid is one or two programs per SM: columns per program chosen for the count, in the
    power-of-two tile above them (`SkinnyConfig.cols`). Gated: n output columns, two weight rows each."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = []
    for per_sm, split, stages in itertools.product((1, 2), splits, (4, 6)):
        cols = -(-n * split // (per_sm * sms))
        cols += cols % 2  # LL words and gated pairs want an even count
        tile = max(16, 1 << (cols - 1).bit_length())
        if cols < tile:
            factor = 2 if gated else 1
            out.append(gemm.SkinnyConfig(factor * tile, 128, split, 4, stages, cols=factor * cols))
    return out


# --wide: other K blocks and 8 warps besides
WIDE = [gemm.SkinnyConfig(bn, bk, split, warps, 4)
        for bn, bk, split, warps in itertools.product((32, 64), (64, 256), (1, 2), (4, 8))]


def graph_us(fns) -> float:
    """Median µs per call of `fns` (one call per weight copy), replayed from a graph of 4 rounds."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    return kernel_bench.graph_us(lambda: [f() for _ in range(4) for f in fns], 4 * len(fns), replays=10)


def measure(name: str, n: int, k: int, candidates=CANDIDATES) -> dict:
    copies = max(2, int(600e6 // (n * k * 2)))
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
    gbytes = n * k * 2 / 1e9
    xs = {m: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for m in (1, 16, 64)}
    cublas = {m: graph_us([lambda w=w, x=x: F.linear(x, w) for w in weights]) for m, x in xs.items()}
    want = F.linear(xs[64].float(), weights[0].float())
    timed = []
    for config in candidates:
        try:
            y = gemm.skinny_linear_triton(xs[64], weights[0], config)
        except OutOfResources:  # too many stages of too large blocks for shared memory
            continue
        if not torch.allclose(y.float(), want, atol=3e-2, rtol=3e-2):
            raise RuntimeError(f"{name} {config}: wrong result")
        timed.append((graph_us([lambda w=w, c=config: gemm.skinny_linear_triton(xs[64], w, c) for w in weights]),
                      config))
    best = min(timed, key=lambda t: t[0])[1]
    no_pdl = graph_us([lambda w=w: gemm.skinny_linear_triton(xs[64], w, best, pdl=False) for w in weights])
    skinny = {m: graph_us([lambda w=w, x=x: gemm.skinny_linear_triton(x, w, best) for w in weights])
              for m, x in xs.items()}
    del weights
    torch.cuda.empty_cache()
    wins = all(skinny[m] < cublas[m] for m in xs) and skinny[64] < 0.97 * cublas[64]
    return {"shape": name, "n": n, "k": k, "config": dataclasses.asdict(best), "wins": wins,
            **{f"cublas_us_{m}": cublas[m] for m in xs}, **{f"skinny_us_{m}": skinny[m] for m in xs},
            "skinny_no_pdl_us_64": no_pdl,
            "cublas_TBps_64": gbytes / cublas[64] * 1e3, "skinny_TBps_64": gbytes / skinny[64] * 1e3}


def layer_chain(group: str, configs: dict[str, gemm.SkinnyConfig], layers: int) -> dict:
    """µs per layer of the four projections in order, each layer its own weights, 64 rows."""
    shapes = SHAPES[group]
    weights = [{name: torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5
                for name, (n, k) in shapes.items()} for _ in range(layers)]
    xs = {name: torch.randn(64, k, dtype=torch.bfloat16, device="cuda") for name, (_, k) in shapes.items()}
    ways = {"cublas": lambda name, w: F.linear(xs[name], w),
            "engine": lambda name, w: gemm.linear(xs[name], w),
            "skinny": lambda name, w: gemm.skinny_linear_triton(xs[name], w, configs[name])}
    out = {}
    for label, call in ways.items():
        fns = [lambda call=call, name=name, w=w: call(name, w) for layer in weights for name, w in layer.items()]
        out[label] = graph_us(fns) * len(shapes)  # graph_us gives µs per call
    del weights
    torch.cuda.empty_cache()
    return out


def push_pairs(rows: int = 64, wide: bool = False) -> dict:
    """What a row-parallel GEMM that pushes its rows (`skinny_linear_push_triton`) costs, on one GPU: a gang
    of two simulated in one stream (each "peer" buffer a local allocation, so the pushed stores cross no
    NVLink). Per TP=2 row-parallel shape (o, down), µs per call: the GEMM as the engine runs it, the same
    GEMM pushing its tiles and flags, and the all-reduce after it that then only waits, sums and normalizes
    (both ranks' GEMMs, then both ranks' all-reduces, per call; the GEMMs' time subtracted); next to it the
    add + RMSNorm alone (no all-reduce), its floor."""
    push_candidates = (PUSH_CANDIDATES + wave_configs(4096, splits=(1,))
                       + ([c for c in WIDE if c.split == 1] if wide else []))
    return {f"{name} {'LL' if ll else 'plain'}": _push_pair(rows, *SHAPES["tp2"][name], ll, push_candidates)
            for name in ("o", "down") for ll in ((True,) if wide else (True, False))}


def _push_pair(rows: int, n: int, k: int, ll: bool, push_candidates, world: int = 2) -> dict:
    from pdserve.kernels import norm

    region = rows * n // 2
    buffers = [torch.zeros(norm.fused_buffer_bytes(world, region), dtype=torch.uint8, device="cuda")
               for _ in range(world)]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda")
    epochs = [torch.zeros(2, dtype=torch.int32, device="cuda") for _ in range(world)]
    res = torch.randn(rows, n, dtype=torch.bfloat16, device="cuda")
    norm_w = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    copies = max(2, int(600e6 // (n * k * 2)))
    weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    slots = itertools.cycle((0, 1))  # consecutive calls alternate, as the engine's do

    def push(w, rank, slot, config=None):
        config = config or best
        return gemm.skinny_linear_push_triton(x, w, config, buffer_ptrs=ptrs, epochs=epochs[rank], slot=slot,
                                              region_words=region, rank=rank, ll=ll)

    # the pushing kernel's configs (no split K), each timed as rank 0 alone
    timed = []
    for config in push_candidates:
        try:
            push(weights[0], 0, 0, config)
        except OutOfResources:
            continue
        timed.append((graph_us([lambda w=w, c=config: push(w, 0, 0, c) for w in weights]), config))
    pushing, best = min(timed, key=lambda t: t[0])
    same = graph_us([lambda w=w: gemm.skinny_linear_triton(x, w, best) for w in weights])

    def call(w, with_norm):
        slot = next(slots)
        parts = [push(w, r, slot) for r in range(world)]
        for r, (y, tiles) in enumerate(parts if with_norm else []):
            norm.all_reduce_add_rms_norm_triton(
                y, res, norm_w, 1e-5, buffer_ptrs=ptrs, epochs=epochs[r], slot=slot, region_words=region,
                rank=r, num_programs=norm.MAX_FUSED_PROGRAMS, ll=ll, pushed_tiles=tiles)

    engine = graph_us([lambda w=w: gemm.linear(x, w) for w in weights])
    gemms = graph_us([lambda w=w: call(w, False) for w in weights])
    pairs = graph_us([lambda w=w: call(w, True) for w in weights])
    partial = gemm.linear(x, weights[0])
    alone = graph_us([lambda: norm.fused_add_rms_norm_triton(partial, res, norm_w, 1e-5)])
    return {"n": n, "k": k, "config": dataclasses.asdict(best), "gemm_us": engine, "gemm_same_config_us": same,
            "gemm_push_us": pushing,
            "pushed_all_reduce_us": (pairs - gemms) / world, "add_rms_norm_us": alone}


def gated(rows=(1, 16, 64)) -> dict:
    """The gate/up projection and SiLU-and-mul after it: as two kernels (the table's GEMM, then
    silu_and_mul) and as one (`skinny_linear_silu_and_mul_triton`, same config), µs per call at TP=1 and
    TP=2 shapes, over enough weight copies that nothing stays in L2."""
    from pdserve.kernels import ops

    out = {}
    for group in ("tp1", "tp2"):
        n, k = SHAPES[group]["gate_up"]
        copies = max(2, int(600e6 // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(copies)]
        config = gemm.gated_config(torch.empty(1, k, dtype=torch.bfloat16, device="cuda"), weights[0])
        x64 = torch.randn(64, k, dtype=torch.bfloat16, device="cuda")
        timed = []  # the grid sized to the SMs (cols), each timed at 64 rows
        for c in wave_configs(n // 2, gated=True, splits=(1,)):
            try:
                timed.append((graph_us([lambda w=w, c=c, x=x64: gemm.skinny_linear_silu_and_mul_triton(x, w, c)
                                        for w in weights]), c))
            except OutOfResources:
                continue
        best = min(timed, key=lambda t: t[0])[1] if timed else None
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            two = graph_us([lambda w=w, x=x: ops.silu_and_mul(gemm.linear(x, w)) for w in weights])
            one, wave = (float("nan") if c is None else graph_us(
                [lambda w=w, x=x, c=c: gemm.skinny_linear_silu_and_mul_triton(x, w, c) for w in weights])
                for c in (config, best))
            out[f"{group} gate_up {m}"] = {"n": n, "k": k, "rows": m, "two_kernels_us": two, "fused_us": one,
                                           "fused_wave_us": wave,
                                           "wave_config": dataclasses.asdict(best) if best else None}
        del weights
        torch.cuda.empty_cache()
    return out


def save(out: str | None, name: str, **results) -> None:
    """Write `results` (and the device's name) as JSON to out/name, where --out was given."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        Path(out, name).write_text(json.dumps({"device": torch.cuda.get_device_name(), **results}, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tp1,tp2", help="groups of SHAPES to time")
    ap.add_argument("--layers", type=int, default=32, help="layers of the layer chain (0: skip it)")
    ap.add_argument("--out", default=None, help="folder for gemm.json")
    ap.add_argument("--push", action="store_true", help="only the GEMMs that push their rows (push_pairs)")
    ap.add_argument("--gated", action="store_true", help="only gate/up with SiLU-and-mul, fused or not")
    ap.add_argument("--wide", action="store_true", help="also K blocks of 64 and 256 and 8 warps")
    ap.add_argument("--only", default=None, help="projections to time (qkv,o,gate_up,down; default all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("tools/gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.gated:
        fused = gated()
        print("gate/up + SiLU-and-mul, µs per call: two kernels | one | one, grid sized to the SMs (config)")
        for name, r in fused.items():
            print(f"{name:>18}  {r['two_kernels_us']:.1f} | {r['fused_us']:.1f} | {r['fused_wave_us']:.1f}"
                  f" ({r['wave_config']})")
        save(args.out, "gemm_gated.json", gated=fused)
        return 0
    if args.push:
        pairs = push_pairs(wide=args.wide)
        print("TP=2 row-parallel GEMMs that push their rows, 64 rows, a gang of 2 simulated on one GPU, µs:")
        print(f"{'shape':>10} {'GEMM (engine)':>14} {'same config':>12} {'GEMM + push':>12} {'pushed all-reduce':>18}"
              f" {'add+norm alone':>15}  config")
        for name, r in pairs.items():
            print(f"{name:>10} {r['gemm_us']:>14.1f} {r['gemm_same_config_us']:>12.1f} {r['gemm_push_us']:>12.1f}"
                  f" {r['pushed_all_reduce_us']:>18.1f} {r['add_rms_norm_us']:>15.1f}  BN{r['config']['block_n']}"
                  f" BK{r['config']['block_k']} w{r['config']['num_warps']} s{r['config']['num_stages']}")
        save(args.out, "gemm_push.json", push=pairs)
        return 0
    rows = []
    print(f"{'shape':>12} {'N':>6} {'K':>6}  µs at 1/16/64 rows: cuBLAS | skinny (best config)   TB/s at 64")
    for group in args.shapes.split(","):
        for name, (n, k) in SHAPES[group].items():
            if args.only and name not in args.only.split(","):
                continue
            r = measure(f"{group} {name}", n, k, CANDIDATES + wave_configs(n) + (WIDE if args.wide else []))
            rows.append(r)
            c = r["config"]
            print(f"{r['shape']:>12} {n:>6} {k:>6}  "
                  f"{r['cublas_us_1']:.1f}/{r['cublas_us_16']:.1f}/{r['cublas_us_64']:.1f}"
                  f" | {r['skinny_us_1']:.1f}/{r['skinny_us_16']:.1f}/{r['skinny_us_64']:.1f} "
                  f"(BN{c['block_n']} BK{c['block_k']} split{c['split']} w{c['num_warps']} s{c['num_stages']})   "
                  f"{r['cublas_TBps_64']:.2f} | {r['skinny_TBps_64']:.2f}{'  <- wins' if r['wins'] else ''}",
                  flush=True)
            print(f"{'':>12} skinny at 64 rows without PDL: {r['skinny_no_pdl_us_64']:.1f}", flush=True)
    chains = {}
    for group in args.shapes.split(",") if args.layers else []:
        configs = {r["shape"].split()[1]: gemm.SkinnyConfig(**r["config"]) for r in rows
                   if r["shape"].startswith(group + " ")}
        chains[group] = layer_chain(group, configs, args.layers)
        print(f"{group} layer chain ({args.layers} layers, 64 rows), µs per layer: "
              + ", ".join(f"{label} {t:.1f}" for label, t in chains[group].items()), flush=True)
    cap = torch.cuda.get_device_capability()
    print(f"\nSKINNY_CONFIGS entries for {torch.cuda.get_device_name()} (capability {cap}):")
    for r in rows:
        if r["wins"]:
            c = r["config"]
            print(f"    ({cap}, {r['n']}, {r['k']}): SkinnyConfig({c['block_n']}, {c['block_k']}, {c['split']}, "
                  f"{c['num_warps']}, {c['num_stages']}),")
    save(args.out, "gemm.json", rows=rows, layer_chains=chains)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
