"""Observable, bounded stages for the two processes of the KV transfer benchmark, and the pipe between them.

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

WATCHDOG_GRACE_S = 3.0  # past a stage's deadline before the watchdog ends a process stuck in a C call


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
