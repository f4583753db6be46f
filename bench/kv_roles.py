"""The two processes of the KV transfer benchmark: what each one does, and how a transfer is timed.

The sender drives: it measures every baseline first (one contiguous NCCL send per size, while no KV pair
exists), then, for each staging configuration, asks the receiver to rebuild its receivers with it and
times transfers of each size. Times run from the sender's start of the transfer to the receiver's last
scatter done, on one monotonic clock (CLOCK_MONOTONIC is shared by every process of a host).
tools/kv_trace.py extends both: requests of its own on the receiver (`ops`), traced rows on the sender.
"""
from __future__ import annotations

import dataclasses
import datetime
import random
import time

import torch
import torch.distributed as dist

from pdserve.bench.kv_setup import RECEIVER, SENDER, Peer, Stages, Staging, checksum, make_cache
from pdserve.kv_transfer import (
    Destination,
    KVReceiver,
    KVSender,
    TransferState,
    TransportKind,
)
from pdserve.kv_transfer.torch_dist import make_group


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


def receiver_main(args, pipe, device: torch.device, stages: Stages, ops: dict | None = None) -> None:
    """Serve the sender's requests until it closes the pipe. `ops`: more requests, by name, each answered by
    `handler(msg, pipe, device, store)`."""
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
        if ops and msg["op"] in ops:
            ops[msg["op"]](msg, pipe, device, store)
        elif msg["op"] == "configure":  # the sender has closed its pairs: rebuild the receivers
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
            receivers[kind].expect(tid, ids, timeout_s=stages.left(), trace=msg["trace"])
            pipe.send("ready")
            result = receivers[kind].wait(tid, stages.left() + 1.0)
            if result.state is not TransferState.DONE:
                raise RuntimeError(f"receiver: stage '{stages.name}': transfer {tid} {result.state.value}: "
                                   f"{result.error}")
            timeline = result.trace.timeline() if result.trace is not None else None  # after the clock stopped
            pipe.send((result.finished_at, checksum(cache, ids) if msg["verify"] else None, timeline))
        stages.enter("waiting for the sender", 4 * args.stage_timeout, quiet=True)
    stages.enter("closing", args.stage_timeout)
    for r in receivers.values():
        r.close()
    if device.type == "cuda":
        group.abort()


def timed_kv(peer: Peer, sender, dest, cache, kind, tid, n, verify, trace=False,
             lead_s: float = 0.0) -> tuple[float, dict | None]:
    """Seconds from start_send to the receiver's finished_at; with trace, both sides' marks as well.

    lead_s > 0: the transfer is started that long before its KV is ready (as a prefill worker starts it
    when the prefill begins), and the clock starts at save_kv: how long the KV takes to land once it exists.
    """
    stages = peer.stages
    ids = random.sample(range(cache.shape[2]), n)
    peer.ask_ready("kv", kind=kind.value, tid=tid, blocks=n, verify=verify, trace=trace)
    if cache.is_cuda:
        torch.cuda.current_stream().synchronize()
    start_ns = time.monotonic_ns()
    sender.start_send(tid, dest, ids, timeout_s=stages.left(), trace=trace)
    if lead_s > 0:
        time.sleep(lead_s)  # the prefill computing
        start_ns = time.monotonic_ns()
    sender.save_kv(tid)
    end, remote_sum, remote_marks = peer.answer()
    result = sender.wait_for_save(tid, stages.left() + 1.0)
    if result.state is not TransferState.DONE:
        raise RuntimeError(f"sender: stage '{stages.name}': transfer {tid} {result.state.value}: {result.error}")
    if verify and remote_sum != checksum(cache, ids):
        raise RuntimeError(f"stage '{stages.name}': {kind.value}: destination blocks differ from source")
    marks = None
    if trace:
        marks = {"tid": tid, "origin_ns": start_ns, "send": result.trace.timeline(), "recv": remote_marks}
    return end - start_ns / 1e9, marks


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
        self.store = dist.TCPStore("127.0.0.1", stages.recv(pipe), is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=args.stage_timeout))
        stages.enter("creating the baseline group", args.stage_timeout)
        self.group = make_group(self.store, 0, SENDER, device, "127.0.0.1", 4 * args.stage_timeout,
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
        endpoints = self.peer.ask("configure", staging=dataclasses.astuple(staging),
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
                    times.append(timed_kv(self.peer, sender, dest, self.cache, kind, self.tid, n, i == 0)[0])
                row[f"{kind.value}_GBps"] = nbytes / median(times[-iters:]) / 1e9
                stages.log(f"{kind.value} {tokens} tokens: {row[f'{kind.value}_GBps']:.2f} GB/s")
                if kind is TransportKind.TORCH and args.prefill_lead_ms > 0:
                    stages.enter(f"torch {tokens} tokens, started {args.prefill_lead_ms:g} ms before the KV is "
                                 f"ready ({iters} transfers)", timeout_s)
                    ready = []
                    for _ in range(iters):
                        self.tid += 1
                        ready.append(timed_kv(self.peer, sender, dest, self.cache, kind, self.tid, n, False,
                                              lead_s=args.prefill_lead_ms / 1e3)[0])
                    row["ready_GBps"] = nbytes / median(ready) / 1e9
                    row["ready_ratio"] = row["ready_GBps"] / row["baseline_GBps"]
                if kind is TransportKind.TORCH:
                    self.more(sender, dest, row, median(times[-iters:]))
            row["ratio"] = row["torch_GBps"] / row["baseline_GBps"]
            rows.append(row)
            report(row)
        stages.enter(f"closing the sender of staging {staging}", args.stage_timeout)
        sender.close()  # first: its pairs end cleanly before the receiver rebuilds or goes
        return rows

    def more(self, sender: KVSender, dest: Destination, row: dict, seconds: float) -> None:
        """After a row's timed transfers over torch.distributed (`seconds`: their median): nothing here; what
        an extension adds to the row (tools/kv_trace.py: a traced transfer's timeline)."""

    def close(self) -> None:
        self.stages.enter("closing", self.args.stage_timeout)
        self.peer.pipe.send(None)
        if self.device.type == "cuda":
            self.group.abort()
