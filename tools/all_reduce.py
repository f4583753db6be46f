"""All-reduce microbenchmark: the symmetric one-shot path (`SymmetricAllReduce`) against NCCL, eager
and inside a CUDA graph, at the message sizes of a decode step; and the all-reduce fused with the residual
add + RMSNorm after it (one kernel, rows sent each way: LL and plain + flags) against the one-shot
all-reduce followed by the add + RMSNorm kernel.

    python tools/all_reduce.py [--sizes 8K,128K,512K,2M,8M] [--out DIR]

Two processes, one GPU each (as in a TP gang), bf16 messages. Before timing, each path's result is
compared with the correctly rounded sum of both ranks' inputs (each rank can rebuild the other's from
its seed). Graph times are per all-reduce, in a graph of 32 back-to-back ones; that is how a decode
step, replayed from its graph, sees them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.bench import kernels as kernel_bench
from pdserve.cluster.tp_gang import NCCL_ENV
from pdserve.engine.parallel import SymmetricAllReduce, TPGroup
from pdserve.kernels import norm

WORLD, PER_GRAPH = 2, 32
HIDDEN = 4096  # rows of the fused all-reduce + RMSNorm: bytes / (HIDDEN * 2)


def parse_size(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1].upper(), 1)
    return int(text.rstrip("kKmM")) * scale


def inputs(nbytes: int, rank: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    return torch.randn(nbytes // 2, generator=gen, device="cuda", dtype=torch.bfloat16)


def eager_us(fn, iters: int = 200) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def graph_us(fn, reset) -> float:
    """Median per-op time of a graph of PER_GRAPH calls; `reset` restores the inputs between replays."""
    return kernel_bench.graph_us(lambda: [fn() for _ in range(PER_GRAPH)], PER_GRAPH, reset=reset)


def measure_size(sym: SymmetricAllReduce, nbytes: int, rank: int) -> dict:
    x = inputs(nbytes, rank)
    exact = (inputs(nbytes, 0).float() + inputs(nbytes, 1).float()).bfloat16()
    nccl_out = x.clone()
    dist.all_reduce(nccl_out)
    row = {"bytes": nbytes, "nccl_exact": torch.equal(nccl_out, exact), "symmetric_exact": torch.equal(sym(x), exact)}
    work = x.clone()  # NCCL reduces in place: restored between graph replays (eager timing ignores values)

    def reset():
        work.copy_(x)

    row["nccl_eager_us"] = eager_us(lambda: dist.all_reduce(work))
    row["symmetric_eager_us"] = eager_us(lambda: sym(x))
    row["nccl_graph_us"] = graph_us(lambda: dist.all_reduce(work), reset)
    outs = []
    row["symmetric_graph_us"] = graph_us(lambda: outs.append(sym(x)), reset)
    row["symmetric_graph_exact"] = torch.equal(outs[-1], exact)
    if nbytes % (HIDDEN * 2) == 0 and nbytes <= sym.max_bytes:
        row.update(measure_fused(sym, nbytes, rank, reset))
    return row


def measure_fused(sym: SymmetricAllReduce, nbytes: int, rank: int, reset) -> dict:
    """[nbytes / 2 / HIDDEN, HIDDEN] partial sums + residual -> RMSNorm: fused kernel against the one-shot
    all-reduce then the add + RMSNorm kernel, both in a graph (slots alternating, as in a model)."""
    parts = [inputs(nbytes, r).view(-1, HIDDEN) for r in range(WORLD)]
    res = inputs(nbytes, 7).view(-1, HIDDEN)
    w = inputs(HIDDEN * 2, 8)
    want_y, want_res = norm.all_reduce_add_rms_norm_ref(parts, res, w, 1e-5)
    calls = []

    def fused():
        calls.append(sym.add_rms_norm(parts[rank], res, w, 1e-5, len(calls) % 2))

    def unfused():
        return norm.fused_add_rms_norm_triton(sym(parts[rank]), res, w, 1e-5)

    unfused()
    row = {"unfused_graph_us": graph_us(unfused, reset)}
    default = sym.ll_max_bytes
    for mode, ll_max in (("ll", nbytes), ("plain", 0)):  # each way of sending the rows, forced
        sym.ll_max_bytes = ll_max
        fused()  # compiled before capture
        row[f"fused_{mode}_graph_us"] = graph_us(fused, reset)
        y, new_res = calls[-1]
        row[f"fused_{mode}_residual_exact"] = torch.equal(new_res, want_res)
        row[f"fused_{mode}_max_err"] = (y.float() - want_y.float()).abs().max().item()
    sym.ll_max_bytes = default
    row["fused_default"] = "ll" if nbytes <= default else "plain"
    return row

def measure_gather(sym: SymmetricAllReduce, rows: int, rank: int, vocab: int = 128256) -> dict:
    """The LM head's logits ([rows, vocab / 2] bf16 per rank) onto fp32 [rows, vocab]: NCCL all-gather +
    reorder + cast (every rank) against the peer-memory gather onto rank 0, µs per call in a graph."""
    shard = inputs(rows * vocab, rank).view(rows, vocab // WORLD)
    tp = TPGroup(rank, WORLD, dist.group.WORLD)
    want = torch.cat([inputs(rows * vocab, r).view(rows, vocab // WORLD) for r in range(WORLD)], 1).float()
    got = [sym.gather_to_first(shard, vocab, torch.float32), tp.all_gather_last_dim(shard)]  # compiled, warm
    row = {"rows": rows, "nccl_graph_us": graph_us(lambda: tp.all_gather_last_dim(shard).float(), lambda: None),
           "peer_graph_us": graph_us(lambda: got.append(sym.gather_to_first(shard, vocab, torch.float32)),
                                     lambda: None)}
    row["peer_exact"] = rank != 0 or torch.equal(got[-1], want)
    return row


def worker(rank: int, port: int, sizes: list[int], out: str | None) -> None:
    os.environ.update(NCCL_ENV)  # the gang's rank environment (multicast off), before CUDA starts
    os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)  # one visible GPU per process, like the gang's actors
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            device_id=device)
    sym = SymmetricAllReduce(dist.group.WORLD, device, max_bytes=max(sizes))
    rows = [measure_size(sym, n, rank) for n in sizes]
    gathers = [measure_gather(sym, r, rank) for r in (1, 16, 64, 256)]
    if rank == 0:
        head = ["nccl eager", "symm eager", "nccl graph", "symm graph"]
        print(f"{'bytes':>9}" + "".join(f"{h:>12}" for h in head) + "  exact (nccl/symm), µs per all-reduce")
        for r in rows:
            print(f"{r['bytes']:>9}{r['nccl_eager_us']:>12.1f}{r['symmetric_eager_us']:>12.1f}"
                  f"{r['nccl_graph_us']:>12.1f}{r['symmetric_graph_us']:>12.1f}  "
                  f"{r['nccl_exact']}/{r['symmetric_exact'] and r['symmetric_graph_exact']}")
        fused = [r for r in rows if "fused_ll_graph_us" in r]
        if fused:
            print(f"\n{'rows':>9}{'AR+norm':>12}{'fused LL':>12}{'fused plain':>12}  default; residual exact, "
                  f"max |y err| (LL/plain) (µs per pair, graph)")
            for r in fused:
                print(f"{r['bytes'] // (HIDDEN * 2):>9}{r['unfused_graph_us']:>12.1f}{r['fused_ll_graph_us']:>12.1f}"
                      f"{r['fused_plain_graph_us']:>12.1f}  {r['fused_default']:>5}; {r['fused_ll_residual_exact']}/"
                      f"{r['fused_plain_residual_exact']}, {r['fused_ll_max_err']:.3g}/{r['fused_plain_max_err']:.3g}")
        print(f"\n{'rows':>9}{'NCCL':>12}{'peer':>12}  exact; LM-head logits onto rank 0 (µs per call, graph)")
        for g in gathers:
            print(f"{g['rows']:>9}{g['nccl_graph_us']:>12.1f}{g['peer_graph_us']:>12.1f}  {g['peer_exact']}")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(out, "all_reduce.json").write_text(json.dumps({"all_reduce": rows, "gather": gathers}, indent=1))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8K,128K,512K,2M,8M", help="message sizes in bytes (K, M suffixes)")
    ap.add_argument("--out", default=None, help="folder for all_reduce.json")
    args = ap.parse_args()
    if torch.cuda.device_count() < WORLD:
        print(f"tools/all_reduce.py needs {WORLD} CUDA GPUs", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, [parse_size(s) for s in args.sizes.split(",")], args.out), nprocs=WORLD)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
