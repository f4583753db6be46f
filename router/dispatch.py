"""Where one attempt of a request runs: a decode lease, a prefill worker, or a colocated worker, each picked
by the pool's routing policy; and the bounded calls that hand the request to them.

A worker that fails or does not answer a call ends the attempt with an UNAVAILABLE `StreamError` naming
the lost role, which the router may retry elsewhere (router/core.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import ray

from pdserve.config import DeploymentConfig
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode, PdserveError, ResourceExhaustedError, WorkerFailedError
from pdserve.messages import KVTarget, PrefillTask, Reservation, TokenOutput
from pdserve.router.lifecycle import RequestState, RequestStream, StreamError
from pdserve.router.policy import LeastQueuedTokens, MostFreeBlocks
from pdserve.router.workers import WorkerHandle

log = logging.getLogger(__name__)

RESERVE_RETRY_S = 0.02  # while no decode worker has room, how often the lease is asked for again


class Dispatch:
    def __init__(self, config: DeploymentConfig, workers: Callable[[], list[WorkerHandle]], spawn):
        self.config, self._workers, self.spawn = config, workers, spawn
        self.prefill_policy, self.decode_policy = LeastQueuedTokens(), MostFreeBlocks()
        self._transfer_ids = itertools.count(1)

    async def prefill(self, stream: RequestStream, prompt: list[int], params: SamplingParams) -> TokenOutput:
        decode, lease = await self._lease(stream, prompt, params)
        stream.move(RequestState.LEASED)
        stream.decode = decode
        prefill = self._pick(self.prefill_policy, "prefill", len(prompt))
        stream.prefill = prefill
        target = KVTarget(lease.transfer_id, lease.destination, lease.block_ids)
        prefill.sent_tokens += len(prompt)
        stream.move(RequestState.PREFILLING)
        # NOTE: not awaited here: the first token, or whatever ends the request first (the submit failing, the
        # decode lease expiring because the KV never came), arrives as an event on the stream.
        self.spawn(self._submit(stream, prefill, PrefillTask(stream.worker_id, prompt, params, target)))
        first = await stream.next_event(self.config.rank_timeout_s, "first token from the prefill worker")
        stream.move(RequestState.TRANSFERRING)
        return first

    async def _submit(self, stream: RequestStream, prefill: WorkerHandle, task: PrefillTask) -> None:
        try:
            await self.call(prefill, prefill.actor.submit.remote(task))
        except PdserveError as e:
            stream.push(e if isinstance(e, StreamError) else StreamError(e.code, e.message))

    async def _lease(self, stream: RequestStream, prompt: list[int], params: SamplingParams):
        """A decode worker's lease on blocks for the prompt; waits (bounded) while none has room."""
        deadline = time.monotonic() + self.config.rank_timeout_s
        blocks = -(-(len(prompt) + 1) // self.config.block_size)
        while True:
            for decode in self.decode_policy.order(self.healthy("decode"), len(prompt)):
                tid = next(self._transfer_ids)
                lease: Reservation | None = await self.call(decode, decode.actor.reserve.remote(
                    stream.worker_id, prompt, params, tid))
                if lease is not None:
                    decode.reserved_blocks += blocks
                    return decode, lease
            if not self.healthy("decode"):
                raise WorkerFailedError("no healthy decode worker")
            if time.monotonic() > deadline:
                raise ResourceExhaustedError(f"no decode worker had room for {len(prompt)} prompt tokens "
                                             f"within {self.config.rank_timeout_s:.0f}s")
            await asyncio.sleep(RESERVE_RETRY_S)

    async def colocated(self, stream: RequestStream, prompt: list[int], params: SamplingParams) -> None:
        worker = self._pick(self.decode_policy, "colocated", len(prompt))
        stream.decode = worker
        worker.sent_tokens += len(prompt)
        stream.move(RequestState.DECODING)
        await self.call(worker, worker.actor.submit.remote(stream.worker_id, prompt, params))

    def _pick(self, policy, role: str, num_tokens: int) -> WorkerHandle:
        ordered = policy.order(self.healthy(role), num_tokens)
        if not ordered:
            raise WorkerFailedError(f"no healthy {role} worker")
        return ordered[0]

    def healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self._workers() if w.role == role and w.healthy]

    async def call(self, worker: WorkerHandle, ref):
        """A bounded call to a worker; a worker that fails or does not answer ends the request UNAVAILABLE."""
        try:
            return await asyncio.wait_for(ref, self.config.rank_timeout_s)
        except asyncio.TimeoutError:
            raise StreamError(ErrorCode.UNAVAILABLE,
                              f"{worker.name} did not answer within {self.config.rank_timeout_s:.0f}s",
                              lost=worker.role) from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PdserveError):
                raise e.cause from None
            raise StreamError(ErrorCode.UNAVAILABLE, f"{worker.name} failed: {e.cause!r}", lost=worker.role) \
                from None
        except ray.exceptions.RayError as e:
            raise StreamError(ErrorCode.UNAVAILABLE, f"{worker.name} is gone ({type(e).__name__})",
                              lost=worker.role) from None

    async def abort_attempt(self, stream: RequestStream) -> None:
        """End the current attempt on the workers that hold it (taken now: a retry replaces them)."""
        worker_id, workers = stream.worker_id, {stream.prefill, stream.decode} - {None}
        for worker in workers:
            if worker.healthy:
                try:
                    await self.call(worker, worker.actor.abort.remote(worker_id))
                except PdserveError as e:
                    log.warning("abort of %s on %s: %s", worker_id, worker.name, e.message)

