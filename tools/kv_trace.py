"""Where a KV transfer's time goes: the KV transfer benchmark's two processes (pdserve.bench.kv_transfer) with,
after each size's timed transfers, --iters more traced on both sides (TransferConfig.trace). Prints the median
one's timeline stage by stage and its critical path (kv_timeline.py), both hosts' latencies first
(kv_probe.py), and with --profile runs torch's profiler around the traced transfers.

    python tools/kv_trace.py [--trace host] [--profile --out DIR] [options of pdserve.bench.kv_transfer]
"""
from __future__ import annotations

import argparse

import kv_probe
import kv_timeline
import torch

from pdserve.bench import kv_transfer
from pdserve.bench.kv_roles import SenderRun, receiver_main, timed_kv
from pdserve.kv_transfer import Destination, KVSender, TransportKind


def parse_args(argv=None) -> argparse.Namespace:
    p = kv_transfer.build_parser(__doc__.splitlines()[0])
    p.add_argument("--trace", nargs="?", const=True, default=True, choices=[True, "host"],
                   help="'host': host stamps only (no CUDA events: cheaper, no device times)")
    p.add_argument("--profile", action="store_true",
                   help="with --out: the traced transfers also run under torch's profiler on both sides (every "
                        "thread's host calls, CUDA API calls, kernels); Chrome traces "
                        "kv_profile_{sender,receiver}_TOKENS.json in --out")
    return kv_transfer.finish_args(p.parse_args(argv))


def profile(profiler, start: bool, path):
    """Start a torch profiler (host calls of every thread, CUDA API calls and kernels), or stop the running
    one and write its Chrome trace to `path`; returns the running profiler or None."""
    if start:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(
            activities=activities, experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))
        profiler.start()
        return profiler
    profiler.stop()
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))
    return None


# ---- receiver: two more requests ------------------------------------------------------------------------
_running: dict = {}  # the receiver's profiler between its two "profile" requests


def _probe(msg, pipe, device, store) -> None:
    pipe.send(kv_probe.host_latencies(device, store))


def _profile(msg, pipe, device, store) -> None:
    _running["profiler"] = profile(_running.pop("profiler", None), msg["start"], msg["path"])
    pipe.send("ready")


def receiver(args, pipe, device, stages) -> None:
    receiver_main(args, pipe, device, stages, ops={"probe": _probe, "profile": _profile})


# ---- sender: traced rows --------------------------------------------------------------------------------
class TracedRun(SenderRun):
    def more(self, sender: KVSender, dest: Destination, row: dict, seconds: float) -> None:
        row["trace"] = self.traced(sender, dest, row, seconds)

    def traced(self, sender: KVSender, dest: Destination, row: dict, untraced_s: float) -> dict:
        """`--iters` more transfers, traced on both sides; the timeline of the median one (kv_timeline)."""
        stages, iters, out = self.stages, self.args.iters, self.args.out
        stages.enter(f"torch {row['tokens']} tokens, {iters} traced transfers", self.args.stage_timeout)
        runs, profiled = [], self.args.profile and out is not None
        if profiled:
            self.peer.ask_ready("profile", start=True, path=None)
            profiler = profile(None, True, None)
        for _ in range(iters):
            self.tid += 1
            runs.append(timed_kv(self.peer, sender, dest, self.cache, TransportKind.TORCH, self.tid,
                                 row["blocks"], False, trace=self.args.trace))
        if profiled:
            profile(profiler, False, out / f"kv_profile_sender_{row['tokens']}.json")
            self.peer.ask_ready("profile", start=False, path=out / f"kv_profile_receiver_{row['tokens']}.json")
        runs.sort(key=lambda run: run[0])
        seconds, marks = runs[len(runs) // 2]
        t = kv_timeline.analyse(marks["send"], marks["recv"], marks["origin_ns"],
                                row["bytes"] / (row["baseline_GBps"] * 1e9) * 1e6)
        t.update(tokens=row["tokens"], bytes=row["bytes"], transfer_id=marks["tid"], traced=iters,
                 duration_us=round(seconds * 1e6, 1), untraced_median_us=round(untraced_s * 1e6, 1))
        return t

    def probe(self) -> dict:
        """Host latencies of both processes (kv_probe), the receiver's first; logged as they come."""
        self.stages.enter("probing host latencies", 2 * self.args.stage_timeout)
        probes = {"receiver": self.peer.ask("probe")}
        probes["sender"] = kv_probe.host_latencies(self.device, self.store)
        self.stages.log(kv_probe.describe("sender", probes["sender"]))
        return probes


class TracedReport(kv_transfer.Report):
    def row(self, r: dict) -> None:
        super().row(r)
        if "trace" in r:
            print(kv_timeline.format_trace(r["trace"]), flush=True)

    def host_latencies(self, probes: dict) -> None:
        self.extra["host_latencies"] = probes
        for role, probe in probes.items():
            print(kv_probe.describe(role, probe), flush=True)


def sender(args, pipe, device, stages) -> None:
    report, run = TracedReport(args), TracedRun(args, pipe, device, stages)
    report.host_latencies(run.probe())
    kv_transfer.sender_main(args, pipe, device, stages, report, run)


def main(argv=None) -> None:
    kv_transfer.run(parse_args(argv), roles=(sender, receiver))


if __name__ == "__main__":
    main()
