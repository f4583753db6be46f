"""One rank of a tensor-parallel gang, as a Ray actor.

Rank 0 owns the scheduler and the sampler (an `LLMEngine`); before each forward it sends
the step's `StepBatch` to the other ranks as two small broadcasts over a gloo control
group (a size header, then the packed int64 tensor) — no pickling per step. Ranks > 0
sit in `serve_steps`, run the same forward in lockstep, and leave on a STOP header.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from pdserve.config import DeploymentConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_runner import ModelRunner, pick_device
from pdserve.engine.model_source import resolve_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.step import StepBatch

STOP, STEP = 0, 1
# The control group waits for the next step while the gang is idle: that wait ends with the
# step, with STOP, or with an error when rank 0's connection closes (it died or was killed).
IDLE_WAIT = datetime.timedelta(days=7)


class _GangEngine(LLMEngine):
    """Rank 0's engine: ships each step to the other ranks before running it."""

    def __init__(self, config: DeploymentConfig, runner: ModelRunner, ctrl: dist.ProcessGroup):
        super().__init__(config, runner)
        self.ctrl = ctrl

    def execute(self, batch: StepBatch) -> torch.Tensor:
        flat = batch.pack()
        dist.broadcast(torch.tensor([STEP, flat.numel()]), 0, group=self.ctrl)
        dist.broadcast(flat, 0, group=self.ctrl)
        return super().execute(batch)

    def stop_peers(self) -> None:
        dist.broadcast(torch.tensor([STOP, 0]), 0, group=self.ctrl)


class TPRank:
    """Wrapped with `ray.remote` by the gang; plain methods so it is testable and readable."""

    def __init__(self, config: dict, rank: int, size: int):
        self.config = DeploymentConfig.model_validate(config)
        self.rank, self.size = rank, size
        self.timeout = datetime.timedelta(seconds=self.config.rank_timeout_s)
        self.store: dist.TCPStore | None = None
        self.engine: _GangEngine | None = None
        self.runner: ModelRunner | None = None

    def host_store(self) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on a port the OS picks (gangs never collide)."""
        host = socket.gethostbyname(socket.gethostname()) if self.size > 1 else "127.0.0.1"
        self.store = dist.TCPStore(host, 0, self.size, True, timeout=self.timeout, wait_for_workers=False)
        return host, self.store.port

    def join(self, host: str, port: int) -> None:
        if self.store is None:
            self.store = dist.TCPStore(host, port, self.size, False, timeout=self.timeout)
        backend = "nccl" if self._use_cuda() else "gloo"
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.size,
                                timeout=self.timeout)
        self.ctrl = dist.new_group(backend="gloo", timeout=IDLE_WAIT)

    def _use_cuda(self) -> bool:
        return self.config.device == "cuda" or (self.config.device == "auto" and torch.cuda.is_available())

    def load(self) -> dict:
        tp = TPGroup(self.rank, self.size, dist.group.WORLD)
        spec = load_model_spec(resolve_model(self.config.model))
        self.runner = ModelRunner(self.config, spec, tp, pick_device(self.config, tp))
        if self.rank == 0:
            self.engine = _GangEngine(self.config, self.runner, self.ctrl)
        return {"num_blocks": self.runner.num_blocks, "max_model_len": self.runner.max_model_len,
                "pid": os.getpid()}

    def serve_steps(self) -> int:
        """Ranks > 0: run every step rank 0 sends until STOP; return the number of steps."""
        steps = 0
        while True:
            header = torch.empty(2, dtype=torch.int64)
            dist.broadcast(header, 0, group=self.ctrl)
            command, size = header.tolist()
            if command == STOP:
                return steps
            flat = torch.empty(size, dtype=torch.int64)
            dist.broadcast(flat, 0, group=self.ctrl)
            self.runner.forward(StepBatch.unpack(flat))
            steps += 1

    # --- rank 0: the engine's interface ---------------------------------------------------
    def add_request(self, prompt_token_ids, params, request_id=None) -> str:
        return self.engine.add_request(prompt_token_ids, params, request_id)

    def step(self):
        return self.engine.step()

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def free_blocks(self) -> tuple[int, int]:
        return self.engine.kv.num_free_blocks, self.engine.kv.num_blocks

    def bench(self, context: int, batches: list[int]) -> dict:
        """Rank 0: time synthetic steps through the gang (see `pdserve.bench.engine`)."""
        from pdserve.bench.engine import measure

        return measure(self.engine, context, batches)

    def shutdown(self) -> None:
        if self.engine is not None and self.size > 1:
            self.engine.stop_peers()
        dist.destroy_process_group()
