"""The IPC transport on one GPU (`python -m pdserve.bench.kv_transfer --transport ipc`): a sender process
writes a Llama-3-8B-shaped prompt's KV into a receiver's cache on the same GPU; each size's effective GB/s
as a ratio to a contiguous device copy of the same bytes measured in the same run.

This process is the receiver (decode rank); one spawned process is the sender (prefill rank). A transfer's
time runs from the sender's `start_send` (its KV already written: `save_kv` follows at once) to the
receiver's DONE (`TransferResult.finished_at`), on one monotonic clock (shared by every process of a
host). Block ids are random and non-contiguous on both sides; a checksum of source and destination blocks
is compared once per size and SM share. Every wait is bounded (`--stage-timeout`).
"""
from __future__ import annotations

import json
import random
import statistics
import time

import torch
import torch.multiprocessing as mp

from pdserve.bench.kv_setup import SENDER, checksum, make_cache
from pdserve.kv_transfer import Destination, KVReceiver, KVSender, TransferConfig, TransferState, TransportKind


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


def sender_main(args, fraction: float, endpoint, jobs, results) -> None:
    """Send each (transfer id, block ids) job as it comes; report (id, start time, checksum or None)."""
    torch.cuda.set_device(0)
    cache, layout = make_cache(args, SENDER, torch.device("cuda", 0))
    config = TransferConfig(timeout_s=args.stage_timeout, copy_sm_fraction=fraction)
    sender = KVSender(layout, cache, lambda ids: None, config=config)
    dest = Destination((endpoint,))
    while (job := jobs.get(timeout=4 * args.stage_timeout)) is not None:
        tid, ids, check = job
        torch.cuda.synchronize()
        start = time.monotonic()
        sender.start_send(tid, dest, ids)
        sender.save_kv(tid)
        state = sender.wait_for_save(tid, args.stage_timeout).state
        results.put((tid, start, state.value, checksum(cache, ids) if check else None))
    sender.close()


def measure(args, fraction: float, receiver: KVReceiver, cache: torch.Tensor) -> list[dict]:
    """One sender process with this SM share; each size's median transfer time over --iters."""
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=sender_main, args=(args, fraction, receiver.endpoint, jobs, results), daemon=True)
    proc.start()
    rows, tid, num_blocks = [], fraction * 1e6, cache.shape[2]
    try:
        for tokens in args.sizes:
            n = tokens // args.shape.block_size
            times, match = [], None
            for i in range(args.warmup + args.iters):
                tid += 1
                src_ids, dst_ids = random.sample(range(num_blocks), n), random.sample(range(num_blocks), n)
                receiver.expect(int(tid), dst_ids, timeout_s=args.stage_timeout)
                jobs.put((int(tid), src_ids, i == 0))
                got, start, state, sent_sum = results.get(timeout=2 * args.stage_timeout)
                result = receiver.wait(int(tid), args.stage_timeout)
                if state != "done" or result.state is not TransferState.DONE:
                    raise RuntimeError(f"transfer {got} failed: sender {state}, receiver {result.error}")
                if sent_sum is not None:
                    match = sent_sum == checksum(cache, dst_ids)
                if i >= args.warmup:
                    times.append(result.finished_at - start)
            nbytes = n * cache[:, :, 0].numel() * cache.element_size()
            copy_s = device_copy_seconds(nbytes, args.iters)
            ipc_s = statistics.median(times)
            rows.append({"tokens": tokens, "bytes": nbytes, "copy_sm_fraction": fraction,
                         "copy_GBps": nbytes / copy_s / 1e9, "ipc_GBps": nbytes / ipc_s / 1e9,
                         "ratio": copy_s / ipc_s, "ipc_ms": ipc_s * 1e3, "checksum_equal": match})
            r = rows[-1]
            print(f"{tokens:>7} {nbytes / 2**20:>8.1f} {fraction:>5.2f} {r['copy_GBps']:>12.1f} "
                  f"{r['ipc_GBps']:>12.1f} {r['ratio']:>6.2f} {r['ipc_ms']:>8.3f} {match!s:>9}", flush=True)
    finally:
        jobs.put(None)
        proc.join(timeout=args.stage_timeout)
        if proc.is_alive():
            proc.kill()
    return rows


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
    print(f"{'tokens':>7} {'MiB':>8} {'SMs':>5} {'copy GB/s':>12} {'ipc GB/s':>12} {'ratio':>6} {'ipc ms':>8} "
          f"{'checksum':>9}", flush=True)
    rows = []
    try:
        for fraction in args.ipc_sm_fractions:
            rows += measure(args, fraction, receiver, cache)
    finally:
        receiver.close()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"device": device, "shape": vars(args.shape), "iters": args.iters, "rows": rows}
        (args.out / "kv_transfer_ipc.json").write_text(json.dumps(record, indent=2))
