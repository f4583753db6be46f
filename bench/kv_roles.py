"""The two processes of the KV transfer benchmark: what each one does, and how a transfer is timed.

The sender drives: it measures every baseline first (one contiguous NCCL send per size, while no KV pair
exists), then, for each staging configuration, asks the receiver to rebuild its receivers with it and
times transfers of each size. Times run from the sender's start of the transfer to the receiver's last
scatter done, on one monotonic clock (CLOCK_MONOTONIC is shared by every process of a host).
"""
from __future__ import annotations

import datetime
import random
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.bench.kv_stages import Peer, Stages
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


@dataclass(frozen=True)
class Staging:
    """One staging configuration: buffers x MiB, first/last messages tapered down to taper_mib (0: off);
    spin: the receiver spins for headers (TransferConfig.spin_for_header)."""

    buffers: int
    mib: int
    taper_mib: float
    spin: bool = False

    @classmethod
    def parse(cls, text: str, default_taper_mib: float, default_spin: bool = False) -> Staging:
        """'4x256', '4x256/8' (taper MiB after the slash), '4x256/8+spin' or '4x256+block'."""
        text, _, wait = text.partition("+")
        size, _, taper = text.partition("/")
        buffers, _, mib = size.partition("x")
        spin = {"spin": True, "block": False, "": default_spin}[wait]
        return cls(int(buffers), int(mib), float(taper) if taper else default_taper_mib, spin)

    def __str__(self) -> str:
        return f"{self.buffers}x{self.mib}/{self.taper_mib:g}" + ("+spin" if self.spin else "")

    def config(self, stage_timeout: float) -> TransferConfig:
        return TransferConfig(timeout_s=stage_timeout, connect_timeout_s=stage_timeout, idle_timeout_s=600,
                              staging_buffers=self.buffers, staging_bytes=self.mib << 20,
                              taper_bytes=int(self.taper_mib * 2**20), spin_for_header=self.spin)


def make_cache(args, rank: int, device: torch.device) -> tuple[torch.Tensor, KVLayout]:
    s = args.shape
    num_blocks = 2 * max(args.all_sizes) // s.block_size  # twice what the largest prompt needs: ids spread out
    cache = torch.empty(s.num_layers, 2, num_blocks, s.num_kv_heads, s.block_size, s.head_dim,
                        dtype=getattr(torch, s.dtype), device=device)
    if rank == SENDER:
        cache.normal_()
    else:
        cache.zero_()
    return cache, KVLayout.of_cache(cache, "llama-3-8b-shape", s.num_kv_heads, 1, 0)


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
    # The host blocks in the driver, as the KV receiver does for its last scatter (cuda_wait.sync_event):
    # both times end within microseconds of the GPU. Bounded by the stage watchdog.
    done.synchronize()


def receiver_main(args, pipe, device: torch.device, stages: Stages) -> None:
    stages.enter("creating the cache", 2 * args.stage_timeout)
    cache, layout = make_cache(args, RECEIVER, device)
    num_blocks = cache.shape[2]
    checksum(cache, [0])  # loads the checksum's kernels now, before any transfer is in flight
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=args.stage_timeout))
    pipe.send(store.port)
    stages.enter("creating the baseline group", args.stage_timeout)
    group = make_group(store, 0, RECEIVER, device, "127.0.0.1", 4 * args.stage_timeout,
                       stages.deadline)
    stages.log("baseline group created")
    bufs: dict[int, torch.Tensor] = {}
    receivers: dict[TransportKind, KVReceiver] = {}
    stages.enter("waiting for the sender", 4 * args.stage_timeout)
    last = None
    while (msg := stages.recv(pipe)) is not None:
        stages.enter(msg["stage"], msg["timeout_s"], quiet=msg["stage"] == last)  # logged once per stage
        last = msg["stage"]
        if msg["op"] == "configure":  # the sender has closed its pairs: rebuild the receivers
            for r in receivers.values():
                r.close()
            config = Staging(*msg["staging"]).config(args.stage_timeout)
            receivers = {TransportKind(k): KVReceiver(layout, cache, lambda ids: None, TransportKind(k),
                                                      config=config) for k in msg["kinds"]}
            pipe.send({k: r.endpoint for k, r in receivers.items()})
        elif msg["op"] == "baseline":
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


def timed_kv(peer: Peer, sender, dest, cache, kind, tid, n, verify) -> float:
    stages = peer.stages
    ids = random.sample(range(cache.shape[2]), n)
    peer.ask_ready("kv", kind=kind.value, tid=tid, blocks=n, verify=verify)
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
    peer.ask_ready("baseline", nbytes=buf.numel())
    if buf.is_cuda:
        torch.cuda.current_stream().synchronize()
    start = time.monotonic()
    group.send([buf], RECEIVER, 0).wait()  # CUDA: orders this stream only; the host does not wait
    return peer.answer() - start  # the receiver's clock when its receive completed (one monotonic clock)


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


class SenderRun:
    """The sender process's measurements: baselines, then one table per staging configuration."""

    def __init__(self, args, pipe, device: torch.device, stages: Stages):
        self.args, self.device, self.stages = args, device, stages
        stages.enter("creating the cache", 2 * args.stage_timeout)
        self.cache, self.layout = make_cache(args, SENDER, device)
        checksum(self.cache, [0])  # loads the checksum's kernels now, before any transfer is in flight
        stages.enter("waiting for the receiver's store", 2 * args.stage_timeout)
        store = dist.TCPStore("127.0.0.1", stages.recv(pipe), is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=args.stage_timeout))
        stages.enter("creating the baseline group", args.stage_timeout)
        self.group = make_group(store, 0, SENDER, device, "127.0.0.1", 4 * args.stage_timeout,
                                stages.deadline)
        stages.log("baseline group created")
        self.peer = Peer(pipe, stages)
        self.baseline: dict[int, float] = {}
        self.tid = 0

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.args.shape.block_size)

    def measure_baselines(self, sizes: list[int]) -> None:
        """Every baseline first, while no KV pair exists: the two groups never carry traffic at once."""
        args, stages = self.args, self.stages
        for tokens in sizes:
            nbytes = self.blocks(tokens) * args.shape.block_bytes()
            stages.enter(f"baseline {tokens} tokens ({nbytes / 2**20:.0f} MiB, {args.warmup}+{args.iters} "
                         f"sends)", args.stage_timeout)
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            times = [timed_baseline(self.peer, self.group, buf) for _ in range(args.warmup + args.iters)]
            self.baseline[tokens] = nbytes / median(times[args.warmup:]) / 1e9
            stages.log(f"baseline {tokens} tokens: {self.baseline[tokens]:.1f} GB/s")
            del buf

    def measure(self, staging: Staging, sizes: list[int], kinds: list[TransportKind], report) -> list[dict]:
        """One row per size with this staging configuration; `report(row)` as soon as each is measured."""
        args, stages = self.args, self.stages
        stages.enter(f"configuring staging {staging}", 2 * args.stage_timeout)
        endpoints = self.peer.ask("configure", staging=(staging.buffers, staging.mib, staging.taper_mib, staging.spin),
                                  kinds=[k.value for k in kinds])
        sender = KVSender(self.layout, self.cache, lambda ids: None, config=staging.config(args.stage_timeout))
        runs = [(TransportKind.TORCH, args.warmup, args.iters, args.stage_timeout),
                (TransportKind.GRPC, 1, args.grpc_iters, 2 * args.stage_timeout)]
        rows = []
        for tokens in sizes:
            n = self.blocks(tokens)
            nbytes = n * args.shape.block_bytes()
            row = {"staging": str(staging), "tokens": tokens, "blocks": n, "bytes": nbytes,
                   "baseline_GBps": self.baseline[tokens]}
            for kind, warmup, iters, timeout_s in runs:
                if kind not in endpoints:
                    continue
                stages.enter(f"{kind.value} {tokens} tokens, staging {staging} ({warmup}+{iters} transfers)",
                             timeout_s)
                dest = Destination((endpoints[kind],))
                times = []
                for i in range(warmup + iters):
                    self.tid += 1
                    times.append(timed_kv(self.peer, sender, dest, self.cache, kind, self.tid, n, i == 0))
                row[f"{kind.value}_GBps"] = nbytes / median(times[-iters:]) / 1e9
                stages.log(f"{kind.value} {tokens} tokens: {row[f'{kind.value}_GBps']:.2f} GB/s")
            row["ratio"] = row["torch_GBps"] / row["baseline_GBps"]
            rows.append(row)
            report(row)
        stages.enter(f"closing the sender of staging {staging}", args.stage_timeout)
        sender.close()  # first: its pairs end cleanly before the receiver rebuilds or goes
        return rows

    def close(self) -> None:
        self.stages.enter("closing", self.args.stage_timeout)
        self.peer.pipe.send(None)
        if self.device.type == "cuda":
            self.group.abort()
