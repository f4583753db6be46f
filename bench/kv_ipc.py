"""The IPC transport on one GPU (`python -m pdserve.bench.kv_transfer --transport ipc`): a sender process
writes a Llama-3-8B-shaped prompt's KV into a receiver's cache on the same GPU; each size's effective GB/s
as a ratio to a contiguous device copy of the same bytes measured in the same run.

This process is the receiver (decode rank); one spawned process is the sender (prefill rank). A transfer's
time runs from the sender's `start_send` (its KV already written: `save_kv` follows at once) to the
receiver's DONE (`TransferResult.finished_at`), on one monotonic clock (shared by every process of a
host); "from ready" rows start it at `save_kv` of a transfer started `--prefill-lead-ms` ahead, as a prefill
worker starts one when its prefill begins. The copy kernel alone (no IPC, no protocol) is timed beside,
and one traced 4k transfer's timeline is printed at the end. Block ids are random and non-contiguous on
both sides; a checksum of source and destination blocks is compared once per size and SM share. Every
wait is bounded (`--stage-timeout`).
"""
from __future__ import annotations

import json
import random
import statistics
import time

import torch
import torch.multiprocessing as mp

from pdserve.bench.kv_setup import SENDER, checksum, make_cache
from pdserve.kernels import ops
from pdserve.kv_transfer import Destination, KVReceiver, KVSender, TransferConfig, TransferState, TransportKind
from pdserve.kv_transfer.staging import copy_programs


def device_copy_seconds(nbytes: int, iters: int) -> float:
    """Median time of one contiguous copy of `nbytes` on this GPU (the ceiling a transfer is compared to)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[3:])


def kernel_seconds(cache: torch.Tensor, n: int, programs: int | None, iters: int) -> float:
    """Median time of the same block copy kernel between two sets of n blocks of this process's cache (no
    IPC, no protocol): what the kernel alone costs."""
    ids = torch.randperm(cache.shape[2], device=cache.device)[:2 * n]
    times = []
    for _ in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ops.copy_blocks(cache, ids[:n], cache, ids[n:], None, None, None, programs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times[3:])


def sender_main(args, fraction: float, endpoint, jobs, results) -> None:
    """Send each (transfer id, block ids, check, trace, lead s) job as it comes: start_send, `lead` later
    save_kv (its clock starts there: a transfer started as prefill began); report (id, start time, state,
    checksum or None, timeline or None)."""
    torch.cuda.set_device(0)
    cache, layout = make_cache(args, SENDER, torch.device("cuda", 0))
    config = TransferConfig(timeout_s=args.stage_timeout, copy_sm_fraction=fraction)
    sender = KVSender(layout, cache, lambda ids: None, config=config)
    dest = Destination((endpoint,))
    while (job := jobs.get(timeout=4 * args.stage_timeout)) is not None:
        tid, ids, check, trace, lead = job
        torch.cuda.synchronize()
        start = time.monotonic()
        sender.start_send(tid, dest, ids, trace=trace)
        if lead:
            time.sleep(lead)
            start = time.monotonic()
        sender.save_kv(tid)
        result = sender.wait_for_save(tid, args.stage_timeout)
        timeline = result.trace.timeline() if result.trace else None
        results.put((tid, start, result.error or result.state.value, checksum(cache, ids) if check else None,
                     timeline))
    sender.close()


class Run:
    """One sender process with one SM share, and the receiver (this process) it sends to."""

    def __init__(self, args, fraction: float, receiver: KVReceiver, cache: torch.Tensor):
        self.args, self.fraction, self.receiver, self.cache = args, fraction, receiver, cache
        ctx = mp.get_context("spawn")
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=sender_main, args=(args, fraction, receiver.endpoint, self.jobs,
                                                          self.results), daemon=True)
        self.proc.start()
        self.tid = int(fraction * 1e6)

    def transfer(self, n: int, check: bool = False, trace: bool = False, lead: float = 0.0) -> tuple:
        """One transfer of n random blocks to n random blocks: (seconds, checksums equal or None, traces)."""
        args, num_blocks = self.args, self.cache.shape[2]
        self.tid += 1
        src_ids, dst_ids = random.sample(range(num_blocks), n), random.sample(range(num_blocks), n)
        self.receiver.expect(self.tid, dst_ids, timeout_s=args.stage_timeout, trace=trace)
        self.jobs.put((self.tid, src_ids, check, trace, lead))
        got, start, state, sent_sum, sent_trace = self.results.get(timeout=2 * args.stage_timeout)
        result = self.receiver.wait(self.tid, args.stage_timeout)
        if state != "done" or result.state is not TransferState.DONE:
            raise RuntimeError(f"transfer {got} failed: sender {state}, receiver {result.error}")
        match = None if sent_sum is None else sent_sum == checksum(self.cache, dst_ids)
        traces = _timeline(start, sent_trace, result.trace.timeline()) if trace else None
        return result.finished_at - start, match, traces

    def row(self, tokens: int) -> dict:
        args, cache = self.args, self.cache
        n = tokens // args.shape.block_size
        match = self.transfer(n, check=True)[1]
        for _ in range(args.warmup):
            self.transfer(n)
        times = [self.transfer(n)[0] for _ in range(args.iters)]
        lead = args.prefill_lead_ms / 1e3
        ready = [self.transfer(n, lead=lead)[0] for _ in range(args.iters)] if lead else None
        trace = self.transfer(n, trace=True)[2]
        nbytes = n * cache[:, :, 0].numel() * cache.element_size()
        copy_s = device_copy_seconds(nbytes, args.iters)
        kernel_s = kernel_seconds(cache, n, copy_programs(cache.device, self.fraction), args.iters)
        ipc_s = statistics.median(times)
        ready_s = statistics.median(ready) if ready else None
        r = {"tokens": tokens, "bytes": nbytes, "copy_sm_fraction": self.fraction,
             "copy_GBps": nbytes / copy_s / 1e9, "kernel_GBps": nbytes / kernel_s / 1e9,
             "ipc_GBps": nbytes / ipc_s / 1e9, "ratio": copy_s / ipc_s, "ipc_ms": ipc_s * 1e3,
             "ready_ratio": copy_s / ready_s if ready_s else None, "checksum_equal": match, "trace": trace}
        ready_text = f"{r['ready_ratio']:>6.2f}" if ready_s else f"{'-':>6}"
        print(f"{tokens:>7} {nbytes / 2**20:>8.1f} {self.fraction:>5.2f} {r['copy_GBps']:>10.1f} "
              f"{r['kernel_GBps']:>10.1f} {r['ipc_GBps']:>10.1f} {r['ratio']:>6.2f} {ready_text} "
              f"{r['ipc_ms']:>8.3f} {match!s:>9}", flush=True)
        return r

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(timeout=self.args.stage_timeout)
        if self.proc.is_alive():
            self.proc.kill()


def _timeline(start: float, *timelines) -> list[str]:
    """Both sides' marks of the traced transfer, in µs from the sender's start (device time beside)."""
    t0 = round(start * 1e9)
    lines = []
    for m in sorted((m for t in timelines if t for m in t), key=lambda m: m["host_ns"]):
        device = "" if m["device_ns"] is None else f" (device {(m['device_ns'] - t0) / 1e3:.1f})"
        lines.append(f"{m['side']:>4} {(m['host_ns'] - t0) / 1e3:9.1f}{device} {m['stage']}")
    return lines


def run(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("the IPC benchmark needs a GPU")
    torch.cuda.set_device(0)
    args.all_sizes = args.sizes
    cache, layout = make_cache(args, 1 - SENDER, torch.device("cuda", 0))
    checksum(cache, [0])  # its kernels loaded before any transfer
    receiver = KVReceiver(layout, cache, lambda ids: None, TransportKind.IPC,
                          config=TransferConfig(timeout_s=args.stage_timeout))
    device = torch.cuda.get_device_name(0)
    print(f"KV transfer over CUDA IPC on one {device}, {args.shape}; ratio = device copy time / transfer time")
    print(f"{'tokens':>7} {'MiB':>8} {'SMs':>5} {'copy GB/s':>10} {'kernel':>10} {'ipc GB/s':>10} {'ratio':>6} "
          f"{'ready':>6} {'ipc ms':>8} {'checksum':>9}", flush=True)
    rows = []
    try:
        for fraction in args.ipc_sm_fractions:
            run = Run(args, fraction, receiver, cache)
            try:
                rows += [run.row(tokens) for tokens in args.sizes]
            finally:
                run.close()
    finally:
        receiver.close()
    for r in rows:
        if r["tokens"] == 4096:
            print(f"traced 4096-token transfer, copies on {r['copy_sm_fraction']:g} of the SMs:", *r["trace"],
                  sep="\n  ")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"device": device, "shape": vars(args.shape), "iters": args.iters, "rows": rows}
        (args.out / "kv_transfer_ipc.json").write_text(json.dumps(record, indent=2))
