"""What every worker actor shares: one engine driven by its own loop thread, fed through a command queue,
reporting through a long-poll.

Ray calls (reserve, submit, abort, ...) arrive on the actor's call threads; the engine is not thread-safe,
so each call hands a closure to the loop and waits (bounded) for its result. The loop runs the closures
between steps, steps the engine while it has work, and collects every sequence's new tokens into one
`WorkerReport`, which the router takes with `poll` — one call per report, never one per token.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import ray

from pdserve.cluster.kv_rank import PeerTransfers
from pdserve.cluster.tp_rank import TPRank
from pdserve.config import DeploymentConfig
from pdserve.engine.llm_engine import LLMEngine, RequestOutput
from pdserve.errors import PdserveError, WorkerFailedError
from pdserve.messages import (
    RequestFailure,
    StepTiming,
    TokenOutput,
    TransferOutcome,
    WorkerInfo,
    WorkerLoad,
    WorkerReport,
)

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # longest the loop sleeps with nothing to do (a command wakes it at once)
BUSY_WAIT_S = 0.001  # while transfers are in flight: how often their state is polled
STEP_LOG = 65536  # step timings kept for `step_timings` (the newest)
REPORT_STEPS = 4096  # step timings a report carries at most (the newest)


class EngineWorker:
    """Base of the prefill, decode and colocated workers (subclasses set `role` and the hooks)."""

    role = "worker"

    def __init__(self, config: dict, name: str, tp_size: int = 1):
        self.config = DeploymentConfig.model_validate(config)
        self.name, self.tp_size = name, tp_size
        # Under TP this actor is rank 0 of the gang (the scheduler, the sampler, the loop); ranks > 0 are
        # ServingRank actors that run its steps and move their own kv heads.
        self.rank0 = TPRank(config, 0, tp_size) if tp_size > 1 else None
        self.peers: PeerTransfers | None = None
        self.engine: LLMEngine | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._report = threading.Condition()
        self._outputs: dict[str, TokenOutput] = {}
        self._failures: list[RequestFailure] = []
        self._transfers: list[TransferOutcome] = []
        self._steps: deque[StepTiming] = deque(maxlen=REPORT_STEPS)
        self.step_log: deque[StepTiming] = deque(maxlen=STEP_LOG)
        self._fatal: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    def host_store(self) -> tuple[str, int]:
        return self.rank0.host_store()

    def join(self, host: str, port: int) -> None:
        self.rank0.join(host, port)

    def load(self, peers: list | None = None) -> WorkerInfo:
        """Build the engine (and the role's transfer ends), start the loop; bounded by the caller. `peers`:
        the gang's ranks > 0 (loading alongside, each with its own transfer end)."""
        if self.rank0 is None:
            self.engine = LLMEngine(self.config)
        else:
            self.rank0.load()
            self.engine = self.rank0.engine
            self.peers = PeerTransfers(peers or [])
        self.engine.record_steps = True
        self.setup()
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()
        return WorkerInfo(self.name, self.role, ray.get_runtime_context().get_node_id(), os.getpid(),
                          self.engine.kv.num_blocks, self.engine.max_model_len)

    def setup(self) -> None:
        """Role hook: create the transfer end, attach connectors to the engine."""

    def publish(self, command: int, message) -> None:
        """Rank 0: tell the other ranks, in order with the steps (KV_EXPECT, KV_SEND)."""
        self.engine.channel.publish(command, message, self.config.rank_timeout_s)

    def peer_results(self) -> list[tuple[int, bool, str | None]]:
        return self.peers.poll() if self.peers is not None else []

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.engine is not None:
            self.teardown()
        if self.rank0 is not None:
            self.rank0.shutdown()  # the other ranks leave their step loops and the group too

    def teardown(self) -> None:
        """Role hook: close the transfer end."""

    def ping(self) -> bool:
        if self._fatal is not None:
            raise WorkerFailedError(f"{self.name}: {self._fatal}")
        return True

    # --- router-facing ------------------------------------------------------------------------
    def poll(self, timeout_s: float) -> WorkerReport:
        """Everything that happened since the previous poll; waits up to `timeout_s` for something."""
        with self._report:
            self._report.wait_for(lambda: self._outputs or self._failures or self._transfers or self._fatal,
                                  timeout_s)
            if self._fatal is not None:
                raise WorkerFailedError(f"{self.name}: {self._fatal}")
            report = WorkerReport(list(self._outputs.values()), self._failures, self._transfers, self.load_now(),
                                  list(self._steps))
            self._outputs, self._failures, self._transfers = {}, [], []
            self._steps.clear()
        return report

    def step_timings(self, clear: bool = False) -> list[StepTiming]:
        """The newest steps' timings (up to STEP_LOG), oldest first; `clear`: start the log afresh."""
        def take() -> list[StepTiming]:
            steps = list(self.step_log)
            if clear:
                self.step_log.clear()
            return steps

        return self.call(take)

    def abort(self, request_id: str) -> None:
        self.call(lambda: self.on_abort(request_id))

    def on_abort(self, request_id: str) -> None:
        """Loop thread: end `request_id` wherever it is on this worker (role hook; extend, call super)."""
        self.engine.abort(request_id)

    def load_now(self) -> WorkerLoad:
        e = self.engine
        sched = e.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        return WorkerLoad(len(sched.running), len(sched.waiting) + len(e.reserved), e.kv.num_free_blocks,
                          e.kv.num_blocks, queued, sched.num_preemptions)

    # --- the loop -----------------------------------------------------------------------------
    def call(self, fn: Callable[[], object], timeout_s: float | None = None) -> object:
        """Run `fn` on the loop thread between steps; its result or its exception, within the bound."""
        if self._fatal is not None:
            raise WorkerFailedError(f"{self.name}: {self._fatal}")
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future.result(timeout=timeout_s or self.config.rank_timeout_s)

    def busy(self) -> bool:
        """Role hook: something besides steps needs polling (transfers in flight)."""
        return False

    def before_step(self) -> None:
        """Role hook, loop thread: collect transfer results, admit arrived KV, release blocks."""

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                self.before_step()
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    self._timed([StepTiming(*t) for t in self.engine.take_step_times()])
                    self.emit(outputs)
                else:
                    self._wake.wait(BUSY_WAIT_S if self.busy() else IDLE_WAIT_S)
                    self._wake.clear()
        except Exception as e:
            log.exception("%s: loop failed", self.name)
            with self._report:
                self._fatal = f"engine loop failed: {type(e).__name__}: {e}"
                self._report.notify_all()

    def _timed(self, steps: list[StepTiming]) -> None:
        self.step_log.extend(steps)
        with self._report:  # NOTE: no notify: timings ride along with the next report, never wake a poll
            self._steps.extend(steps)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except PdserveError as e:
                future.set_exception(e)

    # --- reporting ----------------------------------------------------------------------------
    def emit(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        with self._report:
            for o in outputs:
                self._add_output(o.request_id, o.new_token_ids, o.finish_reason, o.logprobs)
            self._report.notify_all()

    def _add_output(self, request_id: str, token_ids: list[int], finish_reason: str | None, logprobs) -> None:
        """Merge into the pending report (caller holds `_report`)."""
        out = self._outputs.get(request_id)
        if out is None:
            self._outputs[request_id] = TokenOutput(request_id, list(token_ids), finish_reason, list(logprobs))
        else:
            out.token_ids += token_ids
            out.logprobs += logprobs
            out.finish_reason = finish_reason

    def fail(self, request_id: str, code: str, message: str, retry: bool = False) -> None:
        with self._report:
            self._failures.append(RequestFailure(request_id, code, message, retry))
            self._report.notify_all()

    def transferred(self, request_id: str, ok: bool, num_bytes: int, seconds: float) -> None:
        with self._report:
            self._transfers.append(TransferOutcome(request_id, ok, num_bytes, seconds))
            self._report.notify_all()

