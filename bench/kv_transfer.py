"""KV transfer benchmark: two processes (one GPU each), a Llama-3-8B-shaped paged cache, prompts of 1k/4k/16k.

Reports effective GB/s (payload bytes / time from the start of the gather to the receiver's scatter done)
over NCCL, as a ratio to one contiguous NCCL send of the same byte count measured in the same run, and the
gRPC transport's GB/s on the same host. `--device cpu` is a tiny smoke run over gloo.

    python -m pdserve.bench.kv_transfer --out results/
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pdserve.kv_transfer import (
    Destination,
    KVLayout,
    KVReceiver,
    KVSender,
    TransferConfig,
    TransferState,
    TransportKind,
)
from pdserve.kv_transfer.torch_dist import make_group

# NVLink SHARP / multicast stay off on the benchmark machines (every process inherits these).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SENDER, RECEIVER = 0, 1


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * \
            getattr(torch, self.dtype).itemsize


LLAMA3_8B = Shape(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
TINY = Shape(num_layers=4, num_kv_heads=2, head_dim=32, block_size=16, dtype="bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None,
                   help="prompt lengths (default 1024,4096,16384; cpu: 256,1024)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grpc-iters", type=int, default=2)
    p.add_argument("--staging-mib", type=int, default=None,
                   help="staging buffer size = largest message (default 64; cpu: 1)")
    p.add_argument("--staging-buffers", type=int, default=4)
    p.add_argument("--no-grpc", action="store_true")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for kv_transfer.json")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.shape = TINY if cpu else LLAMA3_8B
    args.tokens = args.tokens or ([256, 1024] if cpu else [1024, 4096, 16384])
    args.staging_mib = args.staging_mib or (1 if cpu else 64)
    return args


def make_cache(args, rank: int, device: torch.device) -> tuple[torch.Tensor, KVLayout]:
    s = args.shape
    num_blocks = 2 * max(args.tokens) // s.block_size  # twice what the largest prompt needs: ids spread out
    cache = torch.empty(s.num_layers, 2, num_blocks, s.num_kv_heads, s.block_size, s.head_dim,
                        dtype=getattr(torch, s.dtype), device=device)
    if rank == SENDER:
        cache.normal_()
    else:
        cache.zero_()
    return cache, KVLayout.of_cache(cache, "llama-3-8b-shape", s.num_kv_heads, 1, 0)


def config_of(args) -> TransferConfig:
    return TransferConfig(timeout_s=120, connect_timeout_s=60, idle_timeout_s=600,
                          staging_buffers=args.staging_buffers, staging_bytes=args.staging_mib << 20)


def checksum(cache: torch.Tensor, ids: list[int]) -> int:
    """Exact and order-independent: the blocks' 16-bit patterns summed as integers, a layer at a time."""
    index = torch.tensor(ids, device=cache.device)
    return sum(layer.index_select(1, index).view(torch.int16).to(torch.int64).sum().item() for layer in cache)


def receiver_main(args, pipe, device: torch.device) -> None:
    cache, layout = make_cache(args, RECEIVER, device)
    num_blocks = cache.shape[2]
    kinds = [TransportKind.TORCH] + ([] if args.no_grpc else [TransportKind.GRPC])
    receivers = {k: KVReceiver(layout, cache, lambda ids: None, k, config=config_of(args)) for k in kinds}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    pipe.send(({k: r.endpoint for k, r in receivers.items()}, store.port))
    group = make_group(store, 0, RECEIVER, device, "127.0.0.1", 60)
    while (msg := pipe.recv()) is not None:
        if msg[0] == "baseline":
            buf = torch.empty(msg[1], dtype=torch.uint8, device=device)
            work = group.recv([buf], SENDER, 0)
            pipe.send("ready")
            work.wait()
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            pipe.send(time.monotonic())
        else:
            _, kind, tid, n, verify = msg
            ids = random.sample(range(num_blocks), n)
            receivers[kind].expect(tid, ids)
            pipe.send("ready")
            result = receivers[kind].wait(tid, 300)
            assert result.state is TransferState.DONE, result
            pipe.send((result.finished_at, checksum(cache, ids) if verify else None))
    for r in receivers.values():
        r.close()


def timed_kv(args, pipe, sender, dest, cache, kind, tid, n, verify) -> float:
    ids = random.sample(range(cache.shape[2]), n)
    pipe.send(("kv", kind, tid, n, verify))
    assert pipe.recv() == "ready"
    if cache.is_cuda:
        torch.cuda.synchronize()
    start = time.monotonic()
    sender.start_send(tid, dest, ids)
    sender.save_kv(tid)
    end, remote_sum = pipe.recv()
    assert sender.wait_for_save(tid, 60).state is TransferState.DONE
    if verify:
        assert remote_sum == checksum(cache, ids), f"{kind.value}: destination blocks differ from source"
    return end - start


def timed_baseline(pipe, group, nbytes: int, device: torch.device) -> float:
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pipe.send(("baseline", nbytes))
    assert pipe.recv() == "ready"
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.monotonic()
    group.send([buf], RECEIVER, 0).wait()
    return pipe.recv() - start


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def sender_main(args, pipe, device: torch.device) -> list[dict]:
    cache, layout = make_cache(args, SENDER, device)
    sender = KVSender(layout, cache, lambda ids: None, config=config_of(args))
    endpoints, store_port = pipe.recv()
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False)
    group = make_group(store, 0, SENDER, device, "127.0.0.1", 60)
    rows, tid = [], 0
    for tokens in args.tokens:
        n = -(-tokens // args.shape.block_size)
        nbytes = n * args.shape.block_bytes()
        row = {"tokens": tokens, "blocks": n, "bytes": nbytes}
        base = [timed_baseline(pipe, group, nbytes, device) for _ in range(args.warmup + args.iters)]
        row["baseline_GBps"] = nbytes / median(base[args.warmup:]) / 1e9
        for kind, iters in [(TransportKind.TORCH, args.iters), (TransportKind.GRPC, args.grpc_iters)]:
            if kind not in endpoints:
                continue
            dest = Destination((endpoints[kind],))
            times = []
            for i in range(args.warmup + iters if kind is TransportKind.TORCH else 1 + iters):
                tid += 1
                times.append(timed_kv(args, pipe, sender, dest, cache, kind, tid, n, verify=i == 0))
            row[f"{kind.value}_GBps"] = nbytes / median(times[-iters:]) / 1e9
        row["ratio"] = row["torch_GBps"] / row["baseline_GBps"]
        rows.append(row)
    sender.close()  # first: its pairs end cleanly before the receiver goes
    pipe.send(None)
    return rows


def print_table(args, rows: list[dict]) -> None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    print(f"KV transfer, {args.shape}, staging {args.staging_buffers} x {args.staging_mib} MiB")
    print(f"{'tokens':>7} {'MiB':>8} {'1 send GB/s':>12} {backend + ' KV GB/s':>13} {'ratio':>6} "
          f"{'grpc GB/s':>10}")
    for r in rows:
        grpc = f"{r['grpc_GBps']:10.2f}" if "grpc_GBps" in r else f"{'-':>10}"
        print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['baseline_GBps']:>12.1f} "
              f"{r['torch_GBps']:>13.1f} "
              f"{r['ratio']:>6.2f} {grpc}")


def worker(rank: int, args, pipes) -> None:
    device = torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    random.seed(rank)
    if rank == RECEIVER:
        receiver_main(args, pipes[RECEIVER], device)
        return
    rows = sender_main(args, pipes[SENDER], device)
    print_table(args, rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"shape": vars(args.shape), "device": args.device, "staging_mib": args.staging_mib,
                  "staging_buffers": args.staging_buffers, "iters": args.iters, "rows": rows}
        if args.device == "cuda":
            record["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]
        (args.out / "kv_transfer.json").write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out / 'kv_transfer.json'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in GPU_ENV.items():
        os.environ.setdefault(key, value)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("the benchmark needs two GPUs (or --device cpu for the smoke run)")
    a, b = mp.Pipe()
    mp.spawn(worker, args=(args, (a, b)), nprocs=2, join=True)


if __name__ == "__main__":
    main()
