"""The KV transfer benchmark's harness: what it moves (the cache's shape and contents, the staging
configurations it tries, the checksum that verifies a transfer), and its observable, bounded stages with the
pipe between its two processes.

Each process prints a line on stderr as each stage starts and holds the stage to a deadline: waits on the
peer raise StageTimeout naming the stage, and a watchdog thread ends a process stuck past the deadline in a
call that cannot be interrupted (a CUDA or NCCL call), after printing the stage and every thread's stack.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch

from pdserve.kv_transfer import KVLayout, TransferConfig

SENDER, RECEIVER = 0, 1
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


@dataclass(frozen=True)
class Staging:
    """One staging configuration: buffers x MiB, first/last messages tapered down to taper_mib (0: off);
    spin: the receiver spins for headers (TransferConfig.spin_for_header); copy_sm_fraction: of the SMs the
    gathers and scatters run on (TransferConfig.copy_sm_fraction)."""

    buffers: int
    mib: int
    taper_mib: float
    spin: bool = False
    copy_sm_fraction: float = TransferConfig.copy_sm_fraction
    # other TransferConfig fields, as (name, value) pairs
    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str, default: Staging) -> Staging:
        """'4x256', '4x256/8' (taper MiB after the slash), '4x256/8@0.5' (copies on half the SMs),
        '4x256/8+spin' or '4x256+block', then any other TransferConfig fields as ':name=value'
        ('2x512:receives_ahead=1'); what is not said is `default`'s."""
        text, *fields = text.split(":")
        overrides = []
        for field in fields:
            name, _, value = field.partition("=")
            if name not in TransferConfig.__dataclass_fields__ or not value:
                raise ValueError(f"sweep entry {text!r}: {field!r} is not NAME=VALUE of a TransferConfig field")
            overrides.append((name, float(value)))
        text, _, wait = text.partition("+")
        text, _, fraction = text.partition("@")
        size, _, taper = text.partition("/")
        buffers, _, mib = size.partition("x")
        spin = {"spin": True, "block": False, "": default.spin}[wait]
        return cls(int(buffers), int(mib), float(taper) if taper else default.taper_mib, spin,
                   float(fraction) if fraction else default.copy_sm_fraction, tuple(overrides))

    def __str__(self) -> str:
        return (f"{self.buffers}x{self.mib}/{self.taper_mib:g}@{self.copy_sm_fraction:g}"
                + ("+spin" if self.spin else "+block") + "".join(f":{k}={v:g}" for k, v in self.overrides))

    def config(self, stage_timeout: float) -> TransferConfig:
        return TransferConfig(timeout_s=stage_timeout, connect_timeout_s=stage_timeout, idle_timeout_s=600,
                              staging_buffers=self.buffers, staging_bytes=self.mib << 20,
                              taper_bytes=int(self.taper_mib * 2**20), spin_for_header=self.spin,
                              copy_sm_fraction=self.copy_sm_fraction,
                              **{k: type(getattr(TransferConfig, k))(v) for k, v in self.overrides})


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


class Peer:
    """The sender's side of the pipe: each request names the stage so both processes report the same one."""

    def __init__(self, pipe, stages: Stages):
        self.pipe, self.stages = pipe, stages

    def ask(self, op: str, **fields):
        """Send a request; returns the receiver's first reply (for "kv"/"baseline": "ready")."""
        self.pipe.send({"op": op, "stage": self.stages.name, "timeout_s": self.stages.left(), **fields})
        return self.stages.recv(self.pipe)

    def ask_ready(self, op: str, **fields) -> None:
        if (reply := self.ask(op, **fields)) != "ready":
            raise RuntimeError(f"sender: stage '{self.stages.name}': unexpected reply {reply!r}")

    def answer(self):
        return self.stages.recv(self.pipe)
