"""KV transfer benchmark: two processes (one GPU each), a Llama-3-8B-shaped paged cache, prompts of 1k/4k/16k.

Reports effective GB/s (payload bytes / time from the start of the gather to the receiver's scatter done)
over NCCL, as a ratio to one contiguous NCCL send of the same byte count measured in the same run, and the
gRPC transport's GB/s on the same host. `--device cpu` is a tiny smoke run over gloo. `--sweep` then tries
other staging configurations at 4k and 16k tokens (NCCL only), one table row each.

    python -m pdserve.bench.kv_transfer --out results/ [--sizes 1024,4096] [--skip-grpc] [--sweep]
    python -m pdserve.bench.kv_transfer --transport ipc --out results/   # one GPU: bench/kv_ipc.py

Observable and bounded: each process prints a progress line to stderr at every stage, every stage has a
deadline (a stage that overruns raises an error naming it, or, if a call cannot be interrupted, ends the
process with its name and every thread's stack), and each table row is printed (and kv_transfer.json
rewritten) as soon as it is measured. Stages: bench/kv_setup.py; the two processes: bench/kv_roles.py.
Where a transfer's time goes (traced transfers, host latencies, a profile): tools/kv_trace.py.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import threading
import time

import torch
import torch.multiprocessing as mp

from pdserve.bench.kv_roles import SenderRun, receiver_main
from pdserve.bench.kv_setup import LLAMA3_8B, RECEIVER, SENDER, TINY, Stages, Staging
from pdserve.kv_transfer import TransferConfig, TransportKind

# NVLink SHARP / multicast stay off on the benchmark machines (every process inherits these).
GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
ROLES = {SENDER: "sender", RECEIVER: "receiver"}
# The main table runs the library's default staging (2 x 512 MiB, taper 128 MiB); these are the others tried.
DEFAULT_SWEEP = "4x256/16,4x256/64,4x256/16+block,2x512/16,2x512/64,3x512/64,4x512/64,2x256/64"


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",")]


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--transport", choices=["nccl", "ipc"], default="nccl",
                   help="ipc: one GPU, the IPC transport against a device copy (bench/kv_ipc.py)")
    p.add_argument("--ipc-sm-fractions", type=lambda t: [float(x) for x in t.split(",")], default=[0.5, 1.0],
                   help="ipc: the copy_sm_fraction values to time, one row each")
    p.add_argument("--sizes", "--tokens", dest="sizes", type=_ints, default=None,
                   help="prompt lengths in tokens, e.g. 1024,4096 (default 1024,4096,16384; cpu: 256,1024)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--grpc-iters", type=int, default=2)
    defaults = TransferConfig()
    p.add_argument("--staging-mib", type=int, default=None,
                   help=f"staging buffer size = largest message (default {defaults.staging_bytes >> 20}; cpu: 1)")
    p.add_argument("--staging-buffers", type=int, default=defaults.staging_buffers)
    p.add_argument("--taper-mib", type=float, default=None,
                   help=f"first/last messages taper down to this size, 0: off (default "
                        f"{defaults.taper_bytes >> 20}; cpu: 0)")
    p.add_argument("--spin-for-header", action=argparse.BooleanOptionalAction, default=defaults.spin_for_header,
                   help="main table: the receiver spins for each header (or, with --no-spin-for-header, sleeps "
                        "until it lands) (TransferConfig.spin_for_header; a sweep entry says it with a '+spin' "
                        "or '+block' suffix)")
    p.add_argument("--copy-sm-fraction", type=float, default=defaults.copy_sm_fraction,
                   help="main table: gathers and scatters run on this fraction of the SMs "
                        "(TransferConfig.copy_sm_fraction; a sweep entry says it after an '@')")
    p.add_argument("--prefill-lead-ms", type=float, default=2.0,
                   help="also time transfers started this long before their KV is ready (as a prefill worker "
                        "starts one when the prefill begins), from save_kv to the receiver's end: the "
                        "'from ready' columns (0: skip)")
    p.add_argument("--sweep", nargs="?", const=DEFAULT_SWEEP, default=None,
                   metavar="BxMIB[/TAPER][@SMS][+spin|+block],...",
                   help=f"then time these staging configurations, NCCL only (default {DEFAULT_SWEEP}; cpu: "
                        f"2x1/0,4x1/0.0625)")
    p.add_argument("--sweep-sizes", type=_ints, default=None, help="token counts of the sweep (4096,16384; "
                                                                    "cpu: 1024)")
    p.add_argument("--skip-grpc", "--no-grpc", dest="skip_grpc", action="store_true",
                   help="measure the torch.distributed transport only")
    p.add_argument("--stage-timeout", type=float, default=30.0,
                   help="deadline of one stage in seconds (process setup and gRPC stages get twice it)")
    p.add_argument("--total-timeout", type=float, default=300.0, help="deadline of the whole run in seconds")
    p.add_argument("--out", type=pathlib.Path, default=None, help="folder for kv_transfer.json")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on --device, and the parsed staging configurations."""
    cpu, defaults = args.device == "cpu", TransferConfig()
    args.shape = TINY if cpu else LLAMA3_8B
    args.sizes = args.sizes or ([256, 1024] if cpu else [1024, 4096, 16384])
    staging_mib = args.staging_mib or (1 if cpu else defaults.staging_bytes >> 20)
    taper_mib = args.taper_mib if args.taper_mib is not None else (0 if cpu else defaults.taper_bytes >> 20)
    args.staging = Staging(args.staging_buffers, staging_mib, taper_mib, args.spin_for_header,
                           args.copy_sm_fraction)
    if cpu and args.sweep == DEFAULT_SWEEP:
        args.sweep = "2x1/0,4x1/0.0625"
    sweep = args.sweep.split(",") if args.sweep else []
    args.sweep = [Staging.parse(s, args.staging) for s in sweep]
    args.sweep_sizes = args.sweep_sizes or ([1024] if cpu else [4096, 16384])
    args.all_sizes = sorted(set(args.sizes) | (set(args.sweep_sizes) if args.sweep else set()))
    return args


def parse_args(argv=None) -> argparse.Namespace:
    return finish_args(build_parser().parse_args(argv))


def _ready(r: dict) -> str:
    """The 'from ready' columns: GB/s from save_kv (transfer started ahead) and its ratio to one send."""
    if "ready_GBps" not in r:
        return f"{'-':>11} {'-':>6}"
    return f"{r['ready_GBps']:>11.1f} {r['ready_ratio']:>6.2f}"


class Report:
    """The tables on stdout, a row as soon as it is measured, and kv_transfer.json rewritten after each row."""

    def __init__(self, args):
        self.args, self.rows, self.sweep = args, [], []
        self.extra: dict = {}  # more fields of the JSON record (tools/kv_trace.py: host latencies)
        self.backend = "nccl" if args.device == "cuda" else "gloo"
        print(f"KV transfer, {args.shape}, staging {args.staging_buffers} x {args.staging.mib} MiB, "
              f"taper {args.staging.taper_mib:g} MiB, header wait {'spin' if args.staging.spin else 'block'}, "
              f"copies on {args.staging.copy_sm_fraction:g} of the SMs", flush=True)
        print(f"{'tokens':>7} {'MiB':>8} {'1 send GB/s':>12} {self.backend + ' KV GB/s':>13} {'ratio':>6} "
              f"{'from ready':>11} {'ratio':>6} {'grpc GB/s':>10}", flush=True)

    def row(self, r: dict) -> None:
        grpc = f"{r['grpc_GBps']:10.2f}" if "grpc_GBps" in r else f"{'-':>10}"
        print(f"{r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['baseline_GBps']:>12.1f} "
              f"{r['torch_GBps']:>13.1f} {r['ratio']:>6.2f} {_ready(r)} {grpc}", flush=True)
        self.rows.append(r)
        self.write(done=False)

    def sweep_header(self) -> None:
        print("sweep: staging BUFFERS x MiB / taper MiB @ fraction of the SMs the copies run on [+spin|+block: "
              "receiver spins or sleeps for headers]", flush=True)
        print(f"{'staging':>15} {'tokens':>7} {'MiB':>8} {'1 send GB/s':>12} {self.backend + ' KV GB/s':>13} "
              f"{'ratio':>6} {'from ready':>11} {'ratio':>6}", flush=True)

    def sweep_row(self, r: dict) -> None:
        print(f"{r['staging']:>15} {r['tokens']:>7} {r['bytes'] / 2**20:>8.1f} {r['baseline_GBps']:>12.1f} "
              f"{r['torch_GBps']:>13.1f} {r['ratio']:>6.2f} {_ready(r)}", flush=True)
        self.sweep.append(r)
        self.write(done=False)

    def write(self, done: bool) -> None:
        args = self.args
        if args.out is None:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"shape": vars(args.shape), "device": args.device, "staging_mib": args.staging.mib,
                  "staging_buffers": args.staging.buffers, "taper_mib": args.staging.taper_mib,
                  "spin_for_header": args.staging.spin, "copy_sm_fraction": args.staging.copy_sm_fraction,
                  "iters": args.iters, "complete": done, "rows": self.rows, "sweep": self.sweep,
                  **self.extra}
        if args.device == "cuda":
            record["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]
        path = args.out / "kv_transfer.json"
        path.write_text(json.dumps(record, indent=2))
        if done:
            print(f"wrote {path}", flush=True)


def sender_main(args, pipe, device: torch.device, stages: Stages, report: Report | None = None,
                sender_run: SenderRun | None = None) -> None:
    report = report or Report(args)
    run = sender_run or SenderRun(args, pipe, device, stages)
    run.measure_baselines(args.all_sizes)
    kinds = [TransportKind.TORCH] + ([] if args.skip_grpc else [TransportKind.GRPC])
    run.measure(args.staging, args.sizes, kinds, report.row)
    if args.sweep:
        report.sweep_header()
    for staging in args.sweep:
        run.measure(staging, args.sweep_sizes, [TransportKind.TORCH], report.sweep_row)
    run.close()
    report.write(done=True)


def worker(rank: int, args, pipes, roles=(sender_main, receiver_main)) -> None:
    """One of the two processes; `roles`: (sender's main, receiver's main) as (args, pipe, device, stages)."""
    stages = Stages(ROLES[rank], args.t0, f"process start (pid {os.getpid()})", 2 * args.stage_timeout)
    device = torch.device("cpu")
    if args.device == "cuda":
        stages.enter(f"setting CUDA device {rank}", 2 * args.stage_timeout)
        torch.cuda.set_device(rank)  # before any CUDA call or group, so this process never touches GPU 0's
        device = torch.device("cuda", rank)
        torch.empty(1, device=device)  # the CUDA context, now
        stages.log(f"device set: {device} ({torch.cuda.get_device_name(rank)})")
    random.seed(rank)
    roles[rank](args, pipes[rank], device, stages)
    # What is still running (a transfer thread left behind by a closed sender or receiver shows up here).
    stages.log(f"done; threads left: {sorted(t.name for t in threading.enumerate())}")
    if args.device == "cuda":
        # Leave without running NCCL's and the transfer threads' teardown at interpreter exit (it can hang).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.transport == "ipc":
        from pdserve.bench import kv_ipc
        kv_ipc.run(args)
        return
    run(args)


def run(args: argparse.Namespace, roles=(sender_main, receiver_main)) -> None:
    """Spawn the two processes and supervise them within --total-timeout."""
    for key, value in GPU_ENV.items():
        os.environ.setdefault(key, value)
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("the benchmark needs two GPUs (or --device cpu for the smoke run)")
    args.t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the host
    sweep = f", sweep {len(args.sweep)} stagings at {args.sweep_sizes}" if args.sweep else ""
    print(f"[kv-bench    0.00s main] spawning 2 processes ({args.device}), sizes {args.sizes}{sweep}, "
          f"stage deadline {args.stage_timeout:.0f}s, total {args.total_timeout:.0f}s", file=sys.stderr, flush=True)
    a, b = mp.Pipe()
    context = mp.spawn(worker, args=(args, (a, b), roles), nprocs=2, join=False)
    deadline = args.t0 + args.total_timeout
    while not context.join(timeout=1.0):  # raises, naming the process, if one of them failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise SystemExit(f"kv_transfer benchmark: exceeded --total-timeout {args.total_timeout:.0f}s")


if __name__ == "__main__":
    main()
