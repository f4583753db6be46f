"""The router core: validates and tokenizes a request, admits it, walks it through the workers, streams text.

Disaggregated (the walk of one request, docs/architecture.md): lease blocks on a decode worker (waiting,
bounded, while none has room), hand the prompt and that destination to a prefill worker, stream prefill's
first token at once, tell the decode worker to go on from it once its KV is in, stream its tokens.
Colocated: one worker does both. Either way the text is detokenized incrementally, stop strings end the
request, and closing the stream (client cancel, disconnect, deadline) aborts it wherever it is.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator

from pdserve.config import DeploymentConfig
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError, WorkerFailedError
from pdserve.messages import WorkerReport
from pdserve.router.admission import Admission
from pdserve.router.detokenize import Detokenizer
from pdserve.router.dispatch import Dispatch
from pdserve.router.frontend import GenerateDelta, GenerateInput, ModelInfo, Usage
from pdserve.router.lifecycle import RequestState, RequestStream, StreamError
from pdserve.router.validate import check_request, prompt_ids
from pdserve.router.workers import WorkerHandle, poll_forever

log = logging.getLogger(__name__)

PREFILL_RETRIES = 2  # a request whose prefill worker died runs again on another one, this many times
TRANSFER_RETRIES = 1  # and one whose KV transfer failed


class Router:
    def __init__(self, config: DeploymentConfig, spec: ModelSpec, tokenizer: Tokenizer, model_name: str,
                 workers: list[WorkerHandle], metrics=None):
        self.config, self.spec, self.tokenizer, self.metrics = config, spec, tokenizer, metrics
        self.model_name = model_name
        self.workers = workers
        self.admission = Admission(config.limits.max_concurrent_requests, config.limits.max_queued_requests)
        self.streams: dict[str, RequestStream] = {}
        self.max_model_len = min(w.info.max_model_len for w in workers)
        self.draining = False
        self._ids = itertools.count()
        self._stopping = asyncio.Event()
        self.attempts: dict[str, RequestStream] = {}  # by the id the workers know the current attempt by
        self.on_worker_died = None  # set by the deployment's supervisor: replaces a dead worker
        self.replacements = 0
        self._tasks: set[asyncio.Task] = set()
        self.dispatch = Dispatch(config, lambda: self.workers, self._spawn)

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        for w in self.workers:
            self._spawn(poll_forever(w, self.config.rank_timeout_s, self._deliver, self._died, self._stopping))

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests; wait (bounded) for the running ones; fail what is left with UNAVAILABLE."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for stream in list(self.streams.values()):
            stream.push(StreamError(ErrorCode.UNAVAILABLE, "server is shutting down"))

    async def stop(self) -> None:
        self._stopping.set()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- RouterCore -----------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.max_model_len, self.spec.vocab_size, tuple(self.spec.eos_token_ids))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.hf.decode([token_id])

    def is_serving(self) -> bool:
        roles = {w.role for w in self.workers}
        return not self.draining and all(any(w.healthy for w in self.workers if w.role == r) for r in roles)

    def status(self) -> dict:
        pools = []
        for role in dict.fromkeys(w.role for w in self.workers):
            pools.append({"role": role, "workers": [_worker_status(w) for w in self.workers if w.role == role]})
        return {"model": self.model_name, "serving": self.is_serving(), "pools": pools,
                "queued": self.admission.queued, "running": self.admission.running,
                "replacements": self.replacements}

    async def abort(self, request_id: str) -> bool:
        stream = self.streams.get(request_id)
        if stream is None:
            return False
        stream.push(StreamError(ErrorCode.CANCELLED, "aborted by the client"))
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        try:
            async with contextlib.aclosing(self._generate(request)) as deltas:
                async for delta in deltas:
                    yield delta
        except PdserveError as e:
            # NOTE: counted here, once, whichever stage refused or failed it (checks, a full queue, a worker)
            if self.metrics is not None:
                self.metrics.error(e.code.grpc_name.lower())
            raise

    async def _generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        prompt = prompt_ids(self.tokenizer, request)
        check_request(prompt, request, self.config.limits, self.max_model_len, self.spec.vocab_size)
        if self.draining or not self.is_serving():
            raise WorkerFailedError("server is not serving (draining, or a pool has no healthy worker)")
        request_id = request.request_id or f"req-{next(self._ids)}"
        if request_id in self.streams:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        async with self.admission.slot():
            stream = RequestStream(request_id, len(prompt))
            self.streams[request_id] = stream
            try:
                async for delta in self._stream_text(stream, prompt, request):
                    yield delta
            finally:
                stream.close()
                self.streams.pop(request_id, None)
                self.attempts.pop(stream.worker_id, None)
                if not stream.state.done:
                    stream.move(RequestState.ABORTED)
                    self._spawn(self.dispatch.abort_attempt(stream))

    # --- the walk ------------------------------------------------------------------------------
    async def _stream_text(self, stream: RequestStream, prompt: list[int], request: GenerateInput):
        detok = Detokenizer(self.tokenizer.hf.backend_tokenizer, prompt, request.stop)
        num_out, last = 0, None
        async for out in self._tokens(stream, prompt, request):
            num_out += len(out.token_ids)
            now = time.monotonic()
            if self.metrics is not None and last is not None:
                self.metrics.tokens(len(out.token_ids), (now - last) / max(1, len(out.token_ids)))
            last = now
            text, stopped = detok.add(out.token_ids)
            ids, logprobs = out.token_ids, out.logprobs
            if stopped:  # tokens after the one that completed a stop string are not the client's
                keep = len(ids) - (num_out - detok.num_tokens)
                ids, logprobs, num_out = ids[:keep], logprobs[:keep], detok.num_tokens
            finish = "stop" if stopped else out.finish_reason
            if finish is not None:
                text += "" if stopped else detok.flush()
                stream.move(RequestState.FINISHED)
                if stopped:
                    self._spawn(self.dispatch.abort_attempt(stream))
                self._finished(stream, finish, num_out)
                yield GenerateDelta(text, ids, finish, Usage(len(prompt), num_out), logprobs)
                return
            yield GenerateDelta(text, ids, None, None, logprobs)

    async def _tokens(self, stream: RequestStream, prompt: list[int], request: GenerateInput):
        """The request's token outputs in order; raises PdserveError when it fails.

        A worker that dies, or a KV transfer that fails, does not end the request while its retry budget
        lasts: it runs again elsewhere from its prompt plus the tokens already streamed (a migration, when
        the decode side was lost), under a new id for the workers, and the stream goes on where it was.
        """
        generated: list[int] = []
        budget = {"prefill": PREFILL_RETRIES, "transfer": TRANSFER_RETRIES, "decode": self.config.migration_limit,
                  "colocated": self.config.migration_limit}
        try:
            while True:
                self._new_attempt(stream)
                try:
                    async for out in self._attempt(stream, prompt + generated, request, len(generated)):
                        generated += out.token_ids
                        yield out
                    return
                except StreamError as e:
                    kind = e.lost or ("transfer" if e.retryable else None)
                    if kind is None or budget[kind] <= 0:
                        raise
                    if kind == "transfer":  # run it again on other workers, or not at all
                        stream.avoid |= {w.name for w in (stream.prefill, stream.decode) if w is not None}
                        if not self.dispatch.has_alternative(stream, "prefill"):
                            raise
                    budget[kind] -= 1
                    log.warning("%s: %s; running it again (%d tokens in)", stream.request_id, e.message,
                                len(generated))
                    self._spawn(self.dispatch.abort_attempt(stream))
        except PdserveError:
            if not stream.state.done:
                stream.move(RequestState.FAILED)
            raise

    def _new_attempt(self, stream: RequestStream) -> None:
        stream.attempt += 1
        worker_id = stream.request_id if stream.attempt == 1 else f"{stream.request_id}#{stream.attempt}"
        self.attempts.pop(stream.worker_id, None)
        stream.restart(worker_id)
        self.attempts[worker_id] = stream

    async def _attempt(self, stream: RequestStream, ids: list[int], request: GenerateInput, num_done: int):
        """One run of the request on workers, from `ids` (prompt + tokens already streamed)."""
        params = request.params
        if num_done:
            params = dataclasses.replace(params, max_tokens=params.max_tokens - num_done)
        if self.config.disaggregated:
            first = await self.dispatch.prefill(stream, ids, params)
            if stream.first_token_at is None:
                self._first_token(stream)
            yield first
            if first.finish_reason is not None:
                return
            await self.dispatch.call(stream.decode, stream.decode.actor.start.remote(stream.worker_id,
                                                                               first.token_ids[-1]))
        else:
            await self.dispatch.colocated(stream, ids, params)
        while True:
            out = await stream.next_event(self.config.rank_timeout_s, "tokens from the decode worker")
            if stream.state is RequestState.TRANSFERRING:  # its KV is in: the decode worker runs it
                stream.move(RequestState.DECODING)
            if stream.first_token_at is None:
                self._first_token(stream)
            yield out
            if out.finish_reason is not None:
                return

    # --- reports from the workers ---------------------------------------------------------------
    def _deliver(self, worker: WorkerHandle, report: WorkerReport) -> None:
        for event in (*report.outputs, *report.failures):
            stream = self.attempts.get(event.request_id)  # a finished or superseded attempt's are dropped
            if stream is not None:
                stream.push(event)
        if self.metrics is not None:
            # NOTE: both ends report each transfer; it ends when the decode side has received it (or failed),
            # so only that side's outcome is counted: once per transfer.
            for t in report.transfers:
                if worker.role == "decode":
                    self.metrics.transfer(t.ok, t.num_bytes, t.seconds)
            self.metrics.steps(worker.role, report.steps)
            load = report.load
            self.metrics.set_worker(worker.role, worker.name, load.running, load.waiting,
                                    load.total_blocks - load.free_blocks, load.total_blocks, load.preemptions)
            self.metrics.set_queue_depth(self.admission.queued)

    def _died(self, worker: WorkerHandle, reason: str) -> None:
        """A worker left: it leaves routing now; the requests that still depend on it are told (a prefill
        worker's part ends with the first token; a transfer it leaves half done fails on the decode side by
        itself); the pool's supervisor (`on_worker_died`) replaces it."""
        log.error("worker %s left the pool: %s", worker.name, reason)
        worker.healthy, worker.error = False, reason
        if self.metrics is not None:
            self.metrics.remove_worker(worker.role, worker.name)
        for stream in self.streams.values():
            prefilling = stream.state in (RequestState.LEASED, RequestState.PREFILLING)
            if (worker is stream.prefill and prefilling) or worker is stream.decode:
                stream.push(StreamError(ErrorCode.UNAVAILABLE, reason, lost=worker.role))
        if self.on_worker_died is not None:
            self.on_worker_died(worker)

    def add_worker(self, worker: WorkerHandle, replacing: WorkerHandle | None = None) -> None:
        """A new worker joins routing (in place of `replacing`, a dead one, which leaves the status page)."""
        self.workers = [w for w in self.workers if w is not replacing] + [worker]
        self.replacements += replacing is not None
        self._spawn(poll_forever(worker, self.config.rank_timeout_s, self._deliver, self._died, self._stopping))

    # --- metrics --------------------------------------------------------------------------------
    def _first_token(self, stream: RequestStream) -> None:
        stream.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.first_token(stream.first_token_at - stream.arrived)

    def _finished(self, stream: RequestStream, reason: str, num_out: int) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(reason, stream.num_prompt_tokens, num_out,
                                          time.monotonic() - stream.arrived)
            self.metrics.stages(stream.stage_s)


def _worker_status(w: WorkerHandle) -> dict:
    load = w.load
    return {"name": w.name, "node": w.info.node_id, "pid": w.info.pid, "healthy": w.healthy, "error": w.error,
            "kv_blocks_used": load.total_blocks - load.free_blocks, "kv_blocks_total": load.total_blocks,
            "running": load.running, "waiting": load.waiting}
