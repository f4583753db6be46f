"""The KV transfer's GPU pipeline alone: what the message plan and the copies cost with no protocol around them.

Two processes (one GPU each) and a Llama-3-8B-shaped cache, 4k tokens (256 blocks at random ids). The
receiver posts every receive before the sender starts (no header, no host on the critical path but the
sender's launches); the sender gathers each message into one of two staging buffers and sends it, the
receiver scatters each message as it lands: the same streams and double buffering as kv_transfer. Time:
the sender's host clock before its first launch to the receiver's host seeing its last scatter, median of
--iters. Each plan (layers per message, e.g. 8/18/6) runs as plain sends (no copies) and with the copies on
every SM (one program per block and layer) and on each --sm-fractions of them; ratio = one 512 MiB send
(plan 32, no copies) over the row's time, so 1.0 is the raw-send rate. `launch`: µs the sender's host spends
enqueueing the transfer. With copies, the receiver's destination blocks are checked against the source
blocks after each row. `--graph`: each row also captured once per side in a CUDA graph (ProcessGroupNCCL's
sends and receives included) and replayed.

    python tools/kv_pipeline.py [--plans 32,8/18/6,...] [--sm-fractions 0.25,0.5,0.75] [--graph] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import random
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.bench.kv_setup import LLAMA3_8B
from pdserve.kernels import block_copy

BLOCKS = 256  # 4096 tokens of block_size 16
DEFAULT_PLANS = "32,16/16,8/8/8/8,4/4/4/4/4/4/4/4,8/18/6,2/6/18/6"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", default=DEFAULT_PLANS, help="layers per message, '/'-separated, summing to 32")
    p.add_argument("--sm-fractions", default="0.25,0.5,0.75",
                   help="also run the copies on these fractions of the SMs (block_copy's num_programs)")
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--graph", action="store_true",
                   help="also capture each row's whole sequence (gathers and sends; receives and scatters) in a "
                        "CUDA graph on each side and time its replay, the host's launch included")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for kv_pipeline.json")
    args = p.parse_args(argv)
    args.plans = [[int(x) for x in plan.split("/")] for plan in args.plans.split(",")]
    for plan in args.plans:
        if sum(plan) != LLAMA3_8B.num_layers:
            p.error(f"plan {plan} does not cover {LLAMA3_8B.num_layers} layers")
    args.sm_fractions = [float(f) for f in args.sm_fractions.split(",") if f]
    return args


def run(rank: int, args, port: int) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    s = LLAMA3_8B
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = True  # as the transfer's pairs
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=dev,
                            pg_options=opts)
    host_group = dist.new_group(backend="gloo")
    cache = torch.randn(s.num_layers, 2, 2 * BLOCKS, s.num_kv_heads, s.block_size, s.head_dim,
                        dtype=getattr(torch, s.dtype), device=dev)
    ids = torch.tensor(random.Random(rank).sample(range(2 * BLOCKS), BLOCKS), device=dev)
    shape = (2, BLOCKS, s.num_kv_heads, s.block_size, s.head_dim)  # one layer's payload, per layer count
    layer_bytes = BLOCKS * s.block_bytes() // s.num_layers
    staging = [torch.empty(512 << 20, dtype=torch.uint8, device=dev) for _ in range(2)]
    side, aside = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def payload(k: int, nl: int) -> torch.Tensor:
        return staging[k % 2][:nl * layer_bytes].view(cache.dtype).view(nl, *shape)

    for _ in range(2):  # kernels loaded, communicator up
        block_copy.gather_blocks_into_triton(cache, ids, payload(0, 1), (0, 1))
        block_copy.scatter_blocks_triton(payload(0, 1), cache, ids, (0, 1))
        probe = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
        (dist.send if rank == 0 else dist.recv)(probe, 1 - rank)
    torch.cuda.synchronize()

    def enqueue(plan: list[int], programs: int | None, copies: bool) -> None:
        """The whole transfer on the current stream (`side`), completions and scatters on `aside`."""
        done, layer, here = [], 0, torch.cuda.current_stream()
        for k, nl in enumerate(plan):
            if k >= 2:
                here.wait_event(done[k - 2])  # the buffer's last send completed / scatter ran
            if rank == 0:
                if copies:
                    block_copy.gather_blocks_into_triton(cache, ids, payload(k, nl), (layer, layer + nl),
                                                         num_programs=programs)
                work = dist.isend(staging[k % 2][:nl * layer_bytes], 1)
            else:
                work = dist.irecv(staging[k % 2][:nl * layer_bytes], 0)
            aside.wait_stream(here)
            with torch.cuda.stream(aside):
                work.wait()
                if copies and rank == 1:
                    block_copy.scatter_blocks_triton(payload(k, nl), cache, ids, (layer, layer + nl),
                                                     num_programs=programs)
                done.append(torch.cuda.Event())
                done[-1].record()
            layer += nl
        here.wait_stream(aside)

    def one_transfer(launch) -> tuple[float, float] | None:
        """Sender: (µs from its first launch to the receiver seeing its last scatter, µs the sender's host
        spent launching); receiver: None. `launch()` enqueues the transfer (eagerly, or a graph's replay)."""
        dist.barrier(group=host_group)
        torch.cuda.synchronize()
        if rank == 1:
            with torch.cuda.stream(side):
                launch()
            dist.recv(torch.zeros(1, dtype=torch.float64), 0, group=host_group)  # the sender has started
            side.synchronize()
            dist.send(torch.tensor([time.monotonic()], dtype=torch.float64), 0, group=host_group)
            return None
        time.sleep(0.003)  # every receive is posted by now
        start = time.monotonic()
        with torch.cuda.stream(side):
            launch()
        launched = time.monotonic()
        dist.send(torch.tensor([start], dtype=torch.float64), 1, group=host_group)
        end = torch.zeros(1, dtype=torch.float64)
        dist.recv(end, 1, group=host_group)
        torch.cuda.synchronize()
        return (end.item() - start) * 1e6, (launched - start) * 1e6

    def checksum() -> int:
        return cache.index_select(2, ids).view(torch.int16).to(torch.int64).sum().item()

    def same_blocks() -> bool:
        """The receiver's destination blocks equal the sender's source blocks."""
        sums = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(sums, torch.tensor([checksum()]), group=host_group)
        return sums[0].item() == sums[1].item()

    def captured(plan: list[int], programs: int | None, copies: bool) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
            enqueue(plan, programs, copies)
        return graph

    copy_modes = [("sends", None, False), ("copies on all SMs", None, True)] + [
        (f"copies on {f:g} of the SMs", max(1, int(sms * f)), True) for f in args.sm_fractions]
    rows, base = [], None
    if rank == 0:
        print(f"KV pipeline, {s}, {BLOCKS * s.block_size} tokens ({BLOCKS * s.block_bytes() >> 20} MiB), "
              f"receives posted ahead; median of {args.iters}", flush=True)
        print(f"{'plan (layers/msg)':>20} {'mode':>26} {'launch':>7} {'µs':>9} {'GB/s':>7} {'ratio':>6} "
              f"{'blocks':>7}", flush=True)
    for plan in [[s.num_layers]] + [p for p in args.plans if p != [s.num_layers]]:
        for mode, programs, copies in copy_modes:
            launches = [("eager", functools.partial(enqueue, plan, programs, copies))]
            if args.graph:
                graph = captured(plan, programs, copies)
                launches.append(("graph", graph.replay))
            for how, launch in launches:
                if rank == 1 and copies:
                    cache.zero_()  # the check below then sees what this launch moved
                times = [one_transfer(launch) for _ in range(args.iters)]
                same = same_blocks() if copies else None
                if rank != 0:
                    continue
                us, launch_us = (sorted(t[i] for t in times)[len(times) // 2] for i in (0, 1))
                base = base or us  # the first row: one send of everything, no copies, eager
                label = mode if how == "eager" else f"{mode}, graph"
                row = {"plan": "/".join(map(str, plan)), "mode": mode, "launch": how, "programs": programs,
                       "us": round(us, 1), "launch_us": round(launch_us, 1),
                       "GBps": round(BLOCKS * s.block_bytes() / us / 1e3, 1), "ratio": round(base / us, 3),
                       "blocks_equal": same}
                rows.append(row)
                check = "-" if same is None else ("equal" if same else "DIFFER")
                print(f"{row['plan']:>20} {label:>26} {launch_us:>7.1f} {us:>9.1f} {row['GBps']:>7.1f} "
                      f"{row['ratio']:>6.3f} {check:>7}", flush=True)
                if same is False:
                    raise SystemExit(f"{label}, plan {row['plan']}: destination blocks differ from the source")
    if rank == 0 and args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_pipeline.json").write_text(json.dumps({"sms": sms, "rows": rows}, indent=1))
    sys.stdout.flush()
    os._exit(0)  # no NCCL teardown at interpreter exit


def main(argv=None) -> None:
    args = parse_args(argv)
    if torch.cuda.device_count() < 2:
        raise SystemExit("the pipeline benchmark needs two GPUs")
    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(key, value)
    with socket.socket() as sock:  # a free port for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(run, args=(args, port), nprocs=2)


if __name__ == "__main__":
    main()
