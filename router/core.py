"""The router core: validates and tokenizes a request, admits it, walks it through the workers, streams text.

Disaggregated (the walk of one request, docs/architecture.md): lease blocks on a decode worker (waiting,
bounded, while none has room), hand the prompt and that destination to a prefill worker, stream prefill's
first token at once, tell the decode worker to go on from it once its KV is in, stream its tokens.
Colocated: one worker does both. Either way the text is detokenized incrementally, stop strings end the
request, and closing the stream (client cancel, disconnect, deadline) aborts it wherever it is.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

from pdserve.config import DeploymentConfig
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.tokenizer import Tokenizer
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError, ResourceExhaustedError, WorkerFailedError
from pdserve.messages import KVTarget, PrefillTask, Reservation, TokenOutput, WorkerReport
from pdserve.router.admission import Admission
from pdserve.router.detokenize import Detokenizer
from pdserve.router.frontend import GenerateDelta, GenerateInput, ModelInfo, Usage
from pdserve.router.lifecycle import RequestState, RequestStream, StreamError
from pdserve.router.policy import LeastQueuedTokens, MostFreeBlocks
from pdserve.router.workers import WorkerHandle, poll_forever

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
RESERVE_RETRY_S = 0.02  # while no decode worker has room, how often the lease is asked for again


class Router:
    def __init__(self, config: DeploymentConfig, spec: ModelSpec, tokenizer: Tokenizer, model_name: str,
                 workers: list[WorkerHandle], metrics=None):
        self.config, self.spec, self.tokenizer, self.metrics = config, spec, tokenizer, metrics
        self.model_name = model_name
        self.workers = workers
        self.admission = Admission(config.limits.max_concurrent_requests, config.limits.max_queued_requests)
        self.streams: dict[str, RequestStream] = {}
        self.prefill_policy, self.decode_policy = LeastQueuedTokens(), MostFreeBlocks()
        self.max_model_len = min(w.info.max_model_len for w in workers)
        self.draining = False
        self._transfer_ids = itertools.count(1)
        self._ids = itertools.count()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()

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
                "queued": self.admission.queued, "running": self.admission.running}

    async def abort(self, request_id: str) -> bool:
        stream = self.streams.get(request_id)
        if stream is None:
            return False
        stream.push(StreamError(ErrorCode.CANCELLED, "aborted by the client"))
        return True

    async def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        prompt = self._prompt_ids(request)
        self._check(prompt, request)
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
                self.streams.pop(request_id, None)
                if not stream.state.done:
                    stream.move(RequestState.ABORTED)
                    self._spawn(self._abort_everywhere(stream))

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
                    self._spawn(self._abort_everywhere(stream))
                self._finished(stream, finish, num_out)
                yield GenerateDelta(text, ids, finish, Usage(len(prompt), num_out), logprobs)
                return
            yield GenerateDelta(text, ids, None, None, logprobs)

    async def _tokens(self, stream: RequestStream, prompt: list[int], request: GenerateInput):
        """The request's token outputs in order; raises PdserveError when it fails."""
        timeout = self.config.rank_timeout_s
        try:
            if self.config.disaggregated:
                first = await self._prefill(stream, prompt, request)
                self._first_token(stream)
                yield first
                if first.finish_reason is not None:
                    return
                await self._call(stream.decode, stream.decode.actor.start.remote(stream.request_id,
                                                                                   first.token_ids[-1]))
            else:
                await self._colocated(stream, prompt, request)
            while True:
                out = await stream.next_event(timeout, "tokens from the decode worker")
                if stream.state is RequestState.TRANSFERRING:  # its KV is in: the decode worker runs it
                    stream.move(RequestState.DECODING)
                if stream.first_token_at is None:
                    self._first_token(stream)
                yield out
                if out.finish_reason is not None:
                    return
        except PdserveError as e:
            if not stream.state.done:
                stream.move(RequestState.FAILED)
                if self.metrics is not None:
                    self.metrics.error(e.code.grpc_name.lower())
            raise

    async def _prefill(self, stream: RequestStream, prompt: list[int], request: GenerateInput) -> TokenOutput:
        decode, lease = await self._lease(stream, prompt, request)
        stream.move(RequestState.LEASED)
        stream.decode = decode
        prefill = self._pick(self.prefill_policy, "prefill", len(prompt))
        stream.prefill = prefill
        target = KVTarget(lease.transfer_id, lease.destination, lease.block_ids)
        prefill.sent_tokens += len(prompt)
        stream.move(RequestState.PREFILLING)
        # NOTE: not awaited here: the first token, or whatever ends the request first (the submit failing, the
        # decode lease expiring because the KV never came), arrives as an event on the stream.
        self._spawn(self._submit(stream, prefill, PrefillTask(stream.request_id, prompt, request.params, target)))
        first = await stream.next_event(self.config.rank_timeout_s, "first token from the prefill worker")
        stream.move(RequestState.TRANSFERRING)
        return first

    async def _submit(self, stream: RequestStream, prefill: WorkerHandle, task: PrefillTask) -> None:
        try:
            await self._call(prefill, prefill.actor.submit.remote(task))
        except PdserveError as e:
            stream.push(e if isinstance(e, StreamError) else StreamError(e.code, e.message))

    async def _lease(self, stream: RequestStream, prompt: list[int], request: GenerateInput):
        """A decode worker's lease on blocks for the prompt; waits (bounded) while none has room."""
        deadline = time.monotonic() + self.config.rank_timeout_s
        blocks = -(-(len(prompt) + 1) // self.config.block_size)
        while True:
            for decode in self.decode_policy.order(self._healthy("decode"), len(prompt)):
                tid = next(self._transfer_ids)
                lease: Reservation | None = await self._call(decode, decode.actor.reserve.remote(
                    stream.request_id, prompt, request.params, tid))
                if lease is not None:
                    decode.reserved_blocks += blocks
                    return decode, lease
            if not self._healthy("decode"):
                raise WorkerFailedError("no healthy decode worker")
            if time.monotonic() > deadline:
                raise ResourceExhaustedError(f"no decode worker had room for {len(prompt)} prompt tokens "
                                             f"within {self.config.rank_timeout_s:.0f}s")
            await asyncio.sleep(RESERVE_RETRY_S)

    async def _colocated(self, stream: RequestStream, prompt: list[int], request: GenerateInput) -> None:
        worker = self._pick(self.decode_policy, "colocated", len(prompt))
        stream.decode = worker
        worker.sent_tokens += len(prompt)
        stream.move(RequestState.DECODING)
        await self._call(worker, worker.actor.submit.remote(stream.request_id, prompt, request.params))

    def _pick(self, policy, role: str, num_tokens: int) -> WorkerHandle:
        ordered = policy.order(self._healthy(role), num_tokens)
        if not ordered:
            raise WorkerFailedError(f"no healthy {role} worker")
        return ordered[0]

    def _healthy(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.workers if w.role == role and w.healthy]

    async def _call(self, worker: WorkerHandle, ref):
        """A bounded call to a worker; a worker that fails or does not answer ends the request UNAVAILABLE."""
        import ray

        try:
            return await asyncio.wait_for(ref, self.config.rank_timeout_s)
        except asyncio.TimeoutError:
            raise WorkerFailedError(f"{worker.name} did not answer within {self.config.rank_timeout_s:.0f}s") \
                from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PdserveError):
                raise e.cause from None
            raise WorkerFailedError(f"{worker.name} failed: {e.cause!r}") from None
        except ray.exceptions.RayError as e:
            raise WorkerFailedError(f"{worker.name} is gone ({type(e).__name__})") from None

    async def _abort_everywhere(self, stream: RequestStream) -> None:
        for worker in {stream.prefill, stream.decode} - {None}:
            if worker.healthy:
                try:
                    await self._call(worker, worker.actor.abort.remote(stream.request_id))
                except PdserveError as e:
                    log.warning("abort of %s on %s: %s", stream.request_id, worker.name, e.message)

    # --- reports from the workers ---------------------------------------------------------------
    def _deliver(self, worker: WorkerHandle, report: WorkerReport) -> None:
        for out in report.outputs:
            stream = self.streams.get(out.request_id)
            if stream is not None:
                stream.push(out)
        for failure in report.failures:
            stream = self.streams.get(failure.request_id)
            if stream is not None:
                stream.push(failure)
        if self.metrics is not None:
            for t in report.transfers:
                self.metrics.transfer(t.ok, t.num_bytes, t.seconds)
            load = report.load
            self.metrics.set_worker(worker.role, worker.name, load.running, load.waiting,
                                    load.total_blocks - load.free_blocks, load.total_blocks)
            self.metrics.set_queue_depth(self.admission.queued)

    def _died(self, worker: WorkerHandle, reason: str) -> None:
        """A worker left: the requests that still depend on it fail (a prefill worker's part ends with the
        first token; a transfer it leaves half done fails on the decode side by itself)."""
        log.error("worker %s left the pool: %s", worker.name, reason)
        worker.healthy, worker.error = False, reason
        for stream in self.streams.values():
            prefilling = stream.state in (RequestState.LEASED, RequestState.PREFILLING)
            if (worker is stream.prefill and prefilling) or worker is stream.decode:
                stream.push(StreamError(ErrorCode.UNAVAILABLE, reason))

    # --- validation and metrics ------------------------------------------------------------------
    def _prompt_ids(self, request: GenerateInput) -> list[int]:
        given = [x for x in (request.text, request.token_ids, request.messages) if x is not None]
        if len(given) != 1:
            raise InvalidRequestError("prompt: exactly one of text, token_ids or messages must be given")
        if request.token_ids is not None:
            return list(request.token_ids)
        if request.text is not None:
            if not request.text:
                raise InvalidRequestError("prompt is empty")
            return self.tokenizer.encode_prompt(request.text)
        if not request.messages:
            raise InvalidRequestError("messages: at least one message is needed")
        for i, m in enumerate(request.messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role: unknown role {m.role!r} "
                                          f"(expected one of {', '.join(CHAT_ROLES)})")
        return self.tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in request.messages])

    def _check(self, prompt: list[int], request: GenerateInput) -> None:
        limits = self.config.limits
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if limits.max_prompt_tokens is not None and len(prompt) > limits.max_prompt_tokens:
            raise InvalidRequestError(f"prompt has {len(prompt)} tokens; limits.max_prompt_tokens is "
                                      f"{limits.max_prompt_tokens}")
        if len(prompt) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len} "
                                      f"(room for 1 new token needed)")
        vocab = self.spec.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if request.params.max_tokens > limits.max_tokens:
            raise InvalidRequestError(f"max_tokens must be <= {limits.max_tokens} (limits.max_tokens), "
                                      f"got {request.params.max_tokens}")

    def _first_token(self, stream: RequestStream) -> None:
        stream.first_token_at = time.monotonic()
        if self.metrics is not None:
            self.metrics.first_token(stream.first_token_at - stream.arrived)

    def _finished(self, stream: RequestStream, reason: str, num_out: int) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(reason, stream.num_prompt_tokens, num_out,
                                          time.monotonic() - stream.arrived)


def _worker_status(w: WorkerHandle) -> dict:
    load = w.load
    return {"name": w.name, "node": w.info.node_id, "pid": w.info.pid, "healthy": w.healthy, "error": w.error,
            "kv_blocks_used": load.total_blocks - load.free_blocks, "kv_blocks_total": load.total_blocks,
            "running": load.running, "waiting": load.waiting}
