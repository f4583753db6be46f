"""KV transfer benchmark: two processes (one GPU each), a Llama-3-8B-shaped paged cache, prompts of 1k/4k/16k.

Reports effective GB/s (payload bytes / time from the start of the gather to the receiver's scatter done)
over NCCL, as a ratio to one contiguous NCCL send of the same byte count measured in the same run, and the
gRPC transport's GB/s on the same host. `--device cpu` is a tiny smoke run over gloo.

    python -m pdserve.bench.kv_transfer --out results/ [--sizes 1024,4096] [--skip-grpc]

Observable and bounded: each process prints a progress line to stderr at every stage, every stage has a
deadline (a stage that overruns raises an error naming it, or, if a call cannot be interrupted, ends the
process with its name and every thread's stack), and each table row is printed (and kv_transfer.json
rewritten) as soon as it is measured.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import pathlib
import random
import sys
import threading
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
from pdserve.kv_transfer.torch_dist import make_group, wait_event

# NVLink SHARP / multicast stay off on the benchmark machines (every process inherits these).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SENDER, RECEIVER = 0, 1
ROLES = {SENDER: "sender", RECEIVER: "receiver"}
WATCHDOG_GRACE_S = 3.0  # past a stage's deadline before the watchdog ends a process stuck in a C call


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
    p.add_argument("--sizes", "--tokens", dest="sizes", type=lambda s: [int(t) for t in s.split(",")],
                   default=None, help="prompt lengths in tokens, e.g. 1024,4096 (default 1024,4096,16384; "
                                      "cpu: 256,1024)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grpc-iters", type=int, default=2)
    p.add_argument("--staging-mib", type=int, default=None,
                   help="staging buffer size = largest message (default 64; cpu: 1)")
    p.add_argument("--staging-buffers", type=int, default=4)
    p.add_argument("--skip-grpc", "--no-grpc", dest="skip_grpc", action="store_true",
                   help="measure the torch.distributed transport only")
    p.add_argument("--stage-timeout", type=float, default=30.0,
                   help="deadline of one stage in seconds (process setup and gRPC stages get twice it)")
    p.add_argument("--total-timeout", type=float, default=300.0, help="deadline of the whole run in seconds")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for kv_transfer.json")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.shape = TINY if cpu else LLAMA3_8B
    args.sizes = args.sizes or ([256, 1024] if cpu else [1024, 4096, 16384])
    args.staging_mib = args.staging_mib or (1 if cpu else 64)
    return args


class StageTimeout(RuntimeError):
    pass


class Stages:
    """One process's progress: a line on stderr as each stage starts, and the stage's deadline.

    Waits on the peer check the deadline and raise StageTimeout naming the stage. A call that cannot be
    interrupted (a CUDA or NCCL call) is caught by a watchdog thread: past the deadline it prints the
    stage and every thread's stack, and ends the process (the launcher then stops the other one).
    """

    def __init__(self, role: str, t0: float, first: str, timeout_s: float):
        self.role, self.t0 = role, t0
        self._lock = threading.Lock()
        self.enter(first, timeout_s)
        threading.Thread(target=self._watch, name="bench-watchdog", daemon=True).start()

    def log(self, msg: str) -> None:
        print(f"[kv-bench {time.monotonic() - self.t0:7.2f}s {self.role}] {msg}", file=sys.stderr, flush=True)

    def enter(self, name: str, timeout_s: float, quiet: bool = False) -> None:
        with self._lock:
            self.name, self.deadline = name, time.monotonic() + timeout_s
        if not quiet:
            self.log(f"{name} (deadline {timeout_s:.0f}s)")

    def left(self) -> float:
        return max(self.deadline - time.monotonic(), 0.0)

    def timeout(self, what: str) -> StageTimeout:
        return StageTimeout(f"{self.role}: stage '{self.name}' missed its deadline: {what}")

    def recv(self, pipe):
        """The next message from the peer process, within the stage's deadline."""
        if not pipe.poll(self.left()):
            raise self.timeout("no message from the other process")
        return pipe.recv()

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            with self._lock:
                name, deadline = self.name, self.deadline
            if time.monotonic() > deadline + WATCHDOG_GRACE_S:
                self.log(f"ERROR: stage '{name}' is {WATCHDOG_GRACE_S:.0f}s past its deadline and stuck in a "
                         f"call that cannot be interrupted; stacks of every thread follow, then exit 3")
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(3)


def make_cache(args, rank: int, device: torch.device) -> tuple[torch.Tensor, KVLayout]:
    s = args.shape
    num_blocks = 2 * max(args.sizes) // s.block_size  # twice what the largest prompt needs: ids spread out
    cache = torch.empty(s.num_layers, 2, num_blocks, s.num_kv_heads, s.block_size, s.head_dim,
                        dtype=getattr(torch, s.dtype), device=device)
    if rank == SENDER:
        cache.normal_()
    else:
        cache.zero_()
    return cache, KVLayout.of_cache(cache, "llama-3-8b-shape", s.num_kv_heads, 1, 0)


def config_of(args) -> TransferConfig:
    return TransferConfig(timeout_s=args.stage_timeout, connect_timeout_s=args.stage_timeout,
                          idle_timeout_s=600, staging_buffers=args.staging_buffers,
                          staging_bytes=args.staging_mib << 20)


def checksum(cache: torch.Tensor, ids: list[int]) -> int:
    """Exact and order-independent: the blocks' 16-bit patterns summed as integers, a layer at a time."""
    index = torch.tensor(ids, device=cache.device)
    return sum(layer.index_select(1, index).view(torch.int16).to(torch.int64).sum().item() for layer in cache)


def wait_received(work, device: torch.device, stages: Stages) -> None:
    """The receive is complete (CUDA: its data is on the GPU), within the stage's deadline."""
    if device.type != "cuda":
        if not work.wait(datetime.timedelta(seconds=max(stages.left(), 0.001))):
            raise stages.timeout("the baseline receive did not complete")
        return
    work.wait()  # orders this thread's stream after the receive; the event below tells the host
    done = torch.cuda.Event()
    done.record()
    try:
        wait_event(done, stages.deadline, "baseline receive")
    except Exception as e:
        raise stages.timeout(str(e)) from e


def receiver_main(args, pipe, device: torch.device, stages: Stages) -> None:
    stages.enter("creating the cache and the receivers", 2 * args.stage_timeout)
    cache, layout = make_cache(args, RECEIVER, device)
    num_blocks = cache.shape[2]
    checksum(cache, [0])  # loads the checksum's kernels now, before any transfer is in flight
    kinds = [TransportKind.TORCH] + ([] if args.skip_grpc else [TransportKind.GRPC])
    receivers = {k: KVReceiver(layout, cache, lambda ids: None, k, config=config_of(args)) for k in kinds}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=args.stage_timeout))
    pipe.send(({k: r.endpoint for k, r in receivers.items()}, store.port))
    stages.enter("creating the baseline group", args.stage_timeout)
    group = make_group(store, 0, RECEIVER, device, "127.0.0.1", 4 * args.stage_timeout,
                       stages.deadline)
    stages.log("baseline group created")
    bufs: dict[int, torch.Tensor] = {}
    stages.enter("waiting for the sender", 4 * args.stage_timeout)
    last = None
    while (msg := stages.recv(pipe)) is not None:
        stages.enter(msg["stage"], msg["timeout_s"], quiet=msg["stage"] == last)  # logged once per stage
        last = msg["stage"]
        if msg["op"] == "baseline":
            nbytes = msg["nbytes"]
            buf = bufs.setdefault(nbytes, torch.empty(nbytes, dtype=torch.uint8, device=device))
            work = group.recv([buf], SENDER, 0)
            pipe.send("ready")
            wait_received(work, device, stages)
            pipe.send(time.monotonic())
        else:
            kind, tid, n = TransportKind(msg["kind"]), msg["tid"], msg["blocks"]
            ids = random.sample(range(num_blocks), n)
            receivers[kind].expect(tid, ids, timeout_s=stages.left())
            pipe.send("ready")
            result = receivers[kind].wait(tid, stages.left() + 1.0)
            if result.state is not TransferState.DONE:
                raise RuntimeError(f"receiver: stage '{stages.name}': transfer {tid} {result.state.value}: "
                                   f"{result.error}")
            pipe.send((result.finished_at, checksum(cache, ids) if msg["verify"] else None))
        stages.enter("waiting for the sender", 4 * args.stage_timeout, quiet=True)
    stages.enter("closing", args.stage_timeout)
    for r in receivers.values():
        r.close()
    if device.type == "cuda":
        group.abort()


class Peer:
    """The sender's side of the pipe: each request names the stage so both processes report the same one."""

    def __init__(self, pipe, stages: Stages):
        self.pipe, self.stages = pipe, stages

    def ask(self, op: str, **fields) -> None:
        self.pipe.send({"op": op, "stage": self.stages.name, "timeout_s": self.stages.left(), **fields})
        if (reply := self.stages.recv(self.pipe)) != "ready":
            raise RuntimeError(f"sender: stage '{self.stages.name}': unexpected reply {reply!r}")

    def answer(self):
        return self.stages.recv(self.pipe)


def timed_kv(peer: Peer, sender, dest, cache, kind, tid, n, verify) -> float:
    stages = peer.stages
    ids = random.sample(range(cache.shape[2]), n)
    peer.ask("kv", kind=kind.value, tid=tid, blocks=n, verify=verify)
    if cache.is_cuda:
        torch.cuda.current_stream().synchronize()
    start = time.monotonic()
    sender.start_send(tid, dest, ids, timeout_s=stages.left())
    sender.save_kv(tid)
    end, remote_sum = peer.answer()
    result = sender.wait_for_save(tid, stages.left() + 1.0)
    if result.state is not TransferState.DONE:
        raise RuntimeError(f"sender: stage '{stages.name}': transfer {tid} {result.state.value}: {result.error}")
    if verify and remote_sum != checksum(cache, ids):
        raise RuntimeError(f"stage '{stages.name}': {kind.value}: destination blocks differ from source")
    return end - start


def timed_baseline(peer: Peer, group, buf: torch.Tensor) -> float:
    peer.ask("baseline", nbytes=buf.numel())
    if buf.is_cuda:
        torch.cuda.current_stream().synchronize()
    start = time.monotonic()
    group.send([buf], RECEIVER, 0).wait()  # CUDA: orders this stream only; the host does not wait
    return peer.answer() - start  # the receiver's clock when its receive completed (one monotonic clock)


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def sender_main(args, pipe, device: torch.device, stages: Stages, report) -> list[dict]:
    stages.enter("creating the cache and the sender", 2 * args.stage_timeout)
    cache, layout = make_cache(args, SENDER, device)
    checksum(cache, [0])  # loads the checksum's kernels now, before any transfer is in flight
    sender = KVSender(layout, cache, lambda ids: None, config=config_of(args))
    stages.enter("waiting for the receiver's endpoints", 2 * args.stage_timeout)
    endpoints, store_port = stages.recv(pipe)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=args.stage_timeout))
    stages.enter("creating the baseline group", args.stage_timeout)
    group = make_group(store, 0, SENDER, device, "127.0.0.1", 4 * args.stage_timeout, stages.deadline)
    stages.log("baseline group created")
    peer = Peer(pipe, stages)
    bpt = args.shape.block_size

    # Every baseline first, while no KV pair exists: the two groups never carry traffic at the same time.
    baseline = {}
    for tokens in args.sizes:
        nbytes = -(-tokens // bpt) * args.shape.block_bytes()
        stages.enter(f"baseline {tokens} tokens ({nbytes / 2**20:.0f} MiB, {args.warmup}+{args.iters} sends)",
                     args.stage_timeout)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = [timed_baseline(peer, group, buf) for _ in range(args.warmup + args.iters)]
        baseline[tokens] = nbytes / median(times[args.warmup:]) / 1e9
        stages.log(f"baseline {tokens} tokens: {baseline[tokens]:.1f} GB/s")
        del buf

    rows, tid = [], 0
    runs = [(TransportKind.TORCH, args.warmup, args.iters, args.stage_timeout),
            (TransportKind.GRPC, 1, args.grpc_iters, 2 * args.stage_timeout)]
    for tokens in args.sizes:
        n = -(-tokens // bpt)
        nbytes = n * args.shape.block_bytes()
        row = {"tokens": tokens, "blocks": n, "bytes": nbytes, "baseline_GBps": baseline[tokens]}
        for kind, warmup, iters, timeout_s in runs:
            if kind not in endpoints:
                continue
            stages.enter(f"{kind.value} {tokens} tokens ({warmup}+{iters} transfers)", timeout_s)
            dest = Destination((endpoints[kind],))
            times = []
            for i in range(warmup + iters):
                tid += 1
                times.append(timed_kv(peer, sender, dest, cache, kind, tid, n, verify=i == 0))
            row[f"{kind.value}_GBps"] = nbytes / median(times[-iters:]) / 1e9
            stages.log(f"{kind.value} {tokens} tokens: {row[f'{kind.value}_GBps']:.2f} GB/s")
        row["ratio"] = row["torch_GBps"] / row["baseline_GBps"]
        rows.append(row)
        report(rows, done=False)
    stages.enter("closing", args.stage_timeout)
    sender.close()  # first: its pairs end cleanly before the receiver goes
    pipe.send(None)
    if device.type == "cuda":
        group.abort()
    return rows


class Report:
    """The table on stdout, a row as soon as it is measured, and kv_transfer.json rewritten after each row."""

    def __init__(self, args):
        self.args = args
        backend = "nccl" if args.device == "cuda" else "gloo"
        print(f"KV transfer, {args.shape}, staging {args.staging_buffers} x {args.staging_mib} MiB", flush=True)
        print(f"{'tokens':>7} {'MiB':>8} {'1 send GB/s':>12} {backend + ' KV GB/s':>13} {'ratio':>6} "
              f"{'grpc GB/s':>10}", flush=True)

    def __call__(self, rows: list[dict], done: bool) -> None:
        if not done:
            r = rows[-1]
            grpc = f"{r['grpc_GBps']:10.2f}" if "grpc_GBps" in r else f"{'-':>10}"
            print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['baseline_GBps']:>12.1f} "
                  f"{r['torch_GBps']:>13.1f} {r['ratio']:>6.2f} {grpc}", flush=True)
        if self.args.out is None:
            return
        args = self.args
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"shape": vars(args.shape), "device": args.device, "staging_mib": args.staging_mib,
                  "staging_buffers": args.staging_buffers, "iters": args.iters, "complete": done,
                  "rows": rows}
        if args.device == "cuda":
            record["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]
        path = args.out / "kv_transfer.json"
        path.write_text(json.dumps(record, indent=2))
        if done:
            print(f"wrote {path}", flush=True)


def worker(rank: int, args, pipes) -> None:
    stages = Stages(ROLES[rank], args.t0, f"process start (pid {os.getpid()})", 2 * args.stage_timeout)
    device = torch.device("cpu")
    if args.device == "cuda":
        stages.enter(f"setting CUDA device {rank}", 2 * args.stage_timeout)
        torch.cuda.set_device(rank)  # before any CUDA call or group, so this process never touches GPU 0's
        device = torch.device("cuda", rank)
        torch.empty(1, device=device)  # the CUDA context, now
        stages.log(f"device set: {device} ({torch.cuda.get_device_name(rank)})")
    random.seed(rank)
    if rank == RECEIVER:
        receiver_main(args, pipes[RECEIVER], device, stages)
    else:
        report = Report(args)
        report(sender_main(args, pipes[SENDER], device, stages, report), done=True)
    stages.log("done")
    if args.device == "cuda":
        # Leave without running NCCL's and the transfer threads' teardown at interpreter exit (it can hang).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv=None) -> None:
    args = parse_args(argv)
    for key, value in GPU_ENV.items():
        os.environ.setdefault(key, value)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("the benchmark needs two GPUs (or --device cpu for the smoke run)")
    args.t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the host
    print(f"[kv-bench    0.00s main] spawning 2 processes ({args.device}), sizes {args.sizes}, "
          f"stage deadline {args.stage_timeout:.0f}s, total {args.total_timeout:.0f}s", file=sys.stderr, flush=True)
    a, b = mp.Pipe()
    context = mp.spawn(worker, args=(args, (a, b)), nprocs=2, join=False)
    deadline = args.t0 + args.total_timeout
    while not context.join(timeout=1.0):  # raises, naming the process, if one of them failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise SystemExit(f"kv_transfer benchmark: exceeded --total-timeout {args.total_timeout:.0f}s")


if __name__ == "__main__":
    main()
