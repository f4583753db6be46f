"""One rank of a tensor-parallel gang, as a Ray actor.

Rank 0 owns the scheduler and the sampler (an `LLMEngine`); before each forward it hands
the step's `StepBatch`, packed as one int64 tensor, to the other ranks through a shared-
memory `StepChannel` (the gang is on one node) — no pickling, no socket round trip per
step. Ranks > 0 sit in `serve_steps`, run the same forward in lockstep, and leave on STOP.
"""
from __future__ import annotations

import datetime
import gc
import logging
import socket
import threading

import torch
import torch.distributed as dist

from pdserve.cluster.step_channel import StepChannel
from pdserve.config import DeploymentConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_runner import ModelRunner, pick_device, wants_cuda
from pdserve.engine.model_source import resolve_model
from pdserve.engine.parallel import TPGroup
from pdserve.engine.step import StepBatch

STOP, STEP = 0, 1
# Longest a rank waits for its process group to be torn down when the gang stops (see TPRank._leave_group).
LEAVE_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class _GangEngine(LLMEngine):
    """Rank 0's engine: ships each step to the other ranks before running it."""

    def __init__(self, config: DeploymentConfig, runner: ModelRunner, channel: StepChannel):
        super().__init__(config, runner)
        self.channel = channel

    def execute(self, batch: StepBatch, prev_sampled: torch.Tensor | None = None,
                layer_hook=None) -> torch.Tensor:
        self.channel.publish(STEP, batch.pack(), self.config.rank_timeout_s)
        return super().execute(batch, prev_sampled, layer_hook)

    def stop_peers(self) -> None:
        self.channel.publish(STOP, None, self.config.rank_timeout_s)


class TPRank:
    """Wrapped with `ray.remote` by the gang; plain methods so it is testable and readable."""

    def __init__(self, config: dict, rank: int, size: int):
        self.config = DeploymentConfig.model_validate(config)
        self.rank, self.size = rank, size
        self.timeout = datetime.timedelta(seconds=self.config.rank_timeout_s)
        self.store: dist.TCPStore | None = None
        self.engine: LLMEngine | None = None
        self.runner: ModelRunner | None = None
        self.channel: StepChannel | None = None  # rank 0 writes each step there; the others read it

    def host_store(self) -> tuple[str, int]:
        """Rank 0: host the rendezvous store on a port the OS picks (gangs never collide)."""
        host = socket.gethostbyname(socket.gethostname()) if self.size > 1 else "127.0.0.1"
        self.store = dist.TCPStore(host, 0, self.size, True, timeout=self.timeout, wait_for_workers=False)
        return host, self.store.port

    def join(self, host: str, port: int) -> None:
        if self.store is None:
            self.store = dist.TCPStore(host, port, self.size, False, timeout=self.timeout)
        backend = "nccl" if wants_cuda(self.config) else "gloo"
        dist.init_process_group(backend, store=self.store, rank=self.rank, world_size=self.size,
                                timeout=self.timeout)
        if self.size > 1:
            if self.rank == 0:
                self.channel = StepChannel.create(self._channel_capacity(), self.size - 1)
                self.store.set("step_channel", self.channel.name)
            else:
                name = self.store.get("step_channel").decode()
                self.channel = StepChannel(name, self._channel_capacity(), self.size - 1, create=False)

    def _channel_capacity(self) -> int:
        """Words of the largest packed step: tokens, block tables, per-sequence fields."""
        c = self.config
        max_len = c.max_model_len or load_model_spec(resolve_model(c.model)).max_position_embeddings
        width = -(-max_len // c.block_size)
        return StepBatch.max_packed_size(c.max_num_batched_tokens, c.max_num_seqs, width)

    def load(self) -> dict:
        device = pick_device(self.config)
        tp = TPGroup.create(self.rank, self.size, dist.group.WORLD, device, push_gemm=self.config.push_gemm)
        spec = load_model_spec(resolve_model(self.config.model))
        self.runner = ModelRunner(self.config, spec, tp, device)
        if self.rank == 0:
            if self.size == 1:
                self.engine = LLMEngine(self.config, self.runner)
            else:
                self.engine = _GangEngine(self.config, self.runner, self.channel)
        return {"num_blocks": self.runner.num_blocks, "max_model_len": self.runner.max_model_len,
                "symmetric_all_reduce": tp.symmetric is not None}

    def serve_steps(self) -> int:
        """Ranks > 0: run every step rank 0 sends until STOP; return the number of steps."""
        steps = 0
        while True:
            command, flat = self.channel.receive(self.rank - 1)
            if command == STOP:
                self._leave_group()
                return steps
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

    def run_on_engine(self, fn, *args):
        """Rank 0: `fn(engine, *args)`, for drivers of the gang outside serving, such as a benchmark's timed
        steps (`fn` travels by reference: the caller's module is imported here)."""
        return fn(self.engine, *args)

    def shutdown(self) -> None:
        """Rank 0: stop the other ranks' loops (each then leaves the group too), then leave it."""
        if self.engine is not None and self.size > 1:
            self.engine.stop_peers()
        if self.channel is not None:
            self.channel.close()
        self._leave_group()

    def _leave_group(self) -> None:
        """Tear down this rank's process group; every rank does it when the gang stops.

        NOTE: on NCCL the teardown is collective (it flushes and destroys the communicator with the peers), so
        a rank that left it to its actor being killed would hang the others in theirs. The model (with its
        CUDA graphs, which hold references on the communicator) is released first, and the teardown runs on a
        daemon thread bounded by LEAVE_TIMEOUT_S: a peer that never arrives cannot hang this actor.
        """
        self.engine = self.runner = None
        gc.collect()
        thread = threading.Thread(target=dist.destroy_process_group, name="tp-leave-group", daemon=True)
        thread.start()
        thread.join(LEAVE_TIMEOUT_S)
        if thread.is_alive():
            log.warning("tp rank %d: process group teardown did not finish within %.0fs; leaving it",
                        self.rank, LEAVE_TIMEOUT_S)
