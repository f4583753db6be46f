"""The in-process engine: requests in, tokens out, one `step` at a time."""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pdserve.config import DeploymentConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_runner import ModelRunner, pick_device
from pdserve.engine.model_source import resolve_model
from pdserve.engine.parallel import SINGLE
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import Logprobs, SamplerOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.step import StepBatch
from pdserve.errors import InvalidRequestError


class KVSaver(Protocol):
    """The prefill side's connector: ships the KV of requests that hold their blocks."""

    def begin(self, requests: list[Request]) -> Callable[[int], None]:
        """`requests`' prompts are complete with the step about to run: start their transfers; return the
        hook the model calls as each layer's KV is written."""
        ...


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort"
    logprobs: list[dict] = field(default_factory=list)


@dataclass
class _Launched:
    """A step enqueued on the device whose sampled tokens the host has not read yet."""

    sampling: list[Request]  # the requests it samples, in row order
    sampled: torch.Tensor | None  # [N] int64 on the device: where the next step's pending inputs come from
    tokens: torch.Tensor | None  # [N] int64 on the host, filled once `ready` has fired
    logprobs: Logprobs | None  # on the host, likewise
    ready: torch.cuda.Event | None  # CUDA: recorded after the copies to the host
    started: float = 0.0  # host clock when it was launched (with `record_steps`)
    shape: tuple[int, int, bool] = (0, 0, False)  # sequences, tokens, decode (with `record_steps`)

    def live(self) -> bool:
        """Some request it samples for is still running (otherwise its tokens would all be dropped)."""
        return any(not req.is_finished for req in self.sampling)


class LLMEngine:
    """Continuous batching over one model runner.

    With asynchronous scheduling (`async_scheduling`; on by default where the model runs on a GPU) each
    `step` enqueues the next step before it reads the tokens of the one in flight, so the host's work
    (scheduling, building, sampling set-up, detokenizing downstream) overlaps the device's: a decode row's
    input token is then taken on the device from the previous step's samples. Outputs come one step later,
    and a request that stops on a token (EOS, a stop id) has had one more row computed, which is dropped.
    A step where some request uses penalties (they read the full output history) waits for the step in
    flight first.
    """

    def __init__(self, config: DeploymentConfig, runner: ModelRunner | None = None):
        if runner is None:
            spec = load_model_spec(resolve_model(config.model))
            runner = ModelRunner(config, spec, SINGLE, pick_device(config))
        self.config, self.runner, self.spec = config, runner, runner.spec
        self.max_model_len = runner.max_model_len
        self.kv = KVCacheManager(runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        overlap = config.async_scheduling
        self.async_scheduling = runner.device.type == "cuda" if overlap is None else overlap
        # With `record_steps`, each step's time as the engine's loop saw it: from its launch (or the previous
        # step's end, if later) to its tokens being read; (seconds, sequences, tokens, decode) per step, for
        # whoever drives the engine to take (`take_step_times`).
        self.record_steps = False
        self._step_times: list[tuple[float, int, int, bool]] = []
        self._last_resolved = 0.0
        self._in_flight: _Launched | None = None
        # Disaggregation seams (docs/architecture.md): the prefill side's KV saver, requests whose blocks
        # outlive them until their transfer ends, and the decode side's reservations awaiting their KV.
        self.kv_saver: KVSaver | None = None
        self.held: dict[str, Request] = {}
        self.reserved: dict[str, Request] = {}
        # live requests whose transfer ended before their step was read (see release)
        self._release_when_done: set[str] = set()

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, hold_blocks: bool = False) -> str:
        """Validate and queue a request; it joins the running batch at the next step. `hold_blocks`: its
        prompt's KV is shipped (through `kv_saver`), so its blocks stay allocated until `release`."""
        req = self._new_request(prompt_token_ids, params, request_id)
        req.hold_blocks = hold_blocks
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        return req.request_id

    def _new_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None) -> Request:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests or request_id in self.held or request_id in self.reserved:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = torch.Generator(self.runner.device).manual_seed(params.seed)
        return Request(request_id, list(prompt_token_ids), params, self.spec.eos_token_ids, generator=gen)

    # --- prefill side: delayed free ---------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """A held request's transfer ended (or never started): its blocks go back to the pool.

        NOTE: a transfer may end before its request is held: under asynchronous scheduling a step's tokens
        are read one step later, and a transfer written straight into the receiver's cache (IPC) can end
        within that step. Such a request frees its blocks as soon as it finishes, instead of being held."""
        req = self.held.pop(request_id, None)
        if req is not None:
            self.kv.free(req)
        elif request_id in self.requests:
            self._release_when_done.add(request_id)

    # --- decode side: reservations (leases) -------------------------------------------------------
    def can_reserve(self, num_tokens: int) -> bool:
        """Blocks for `num_tokens` are free, beyond one block for each sequence already here (running or
        queued), which may need one more soon: a lease never takes the room running sequences grow into."""
        headroom = len(self.scheduler.running) + len(self.scheduler.waiting)
        return self.kv.pool.can_allocate(-(-num_tokens // self.config.block_size) + headroom)

    def reserve(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> list[int]:
        """Take blocks for the prompt's KV, to be filled by a transfer; the request waits for its KV (not for
        compute) until `admit`. Check `can_reserve` first."""
        req = self._new_request(prompt_token_ids, params, request_id)
        self.kv.allocate(req, len(req.prompt_token_ids))
        req.status = RequestStatus.WAITING_FOR_KV
        self.reserved[request_id] = req
        return list(req.block_table)

    def admit(self, request_id: str, first_token: int) -> None:
        """The reserved request's KV has arrived and prefill sampled `first_token`: it joins the batch with
        its prompt computed and that token as its next input (the prompt is never recomputed here)."""
        req = self.reserved.pop(request_id)
        req.num_computed_tokens = len(req.prompt_token_ids)
        req.append_token(first_token)
        self.requests[request_id] = req
        self.scheduler.add_computed(req)

    def drop_reserved(self, request_id: str) -> None:
        """The reservation ends unused (its transfer failed, its lease expired, or it was aborted): its
        blocks go back, once nothing can still write into them (the caller knows)."""
        req = self.reserved.pop(request_id, None)
        if req is not None:
            self.kv.free(req)

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len} (room for 1 new token needed)"
            )
        bad = next((t for t in ids if not 0 <= t < self.spec.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {self.spec.vocab_size})")

    def abort(self, request_id: str) -> None:
        """End a queued or running request. A held one stays held (its transfer may be reading its blocks);
        a reserved one is the caller's to drop (a transfer may be writing into them)."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
            self._hold(req)

    def _hold(self, req: Request) -> None:
        if req.request_id in self._release_when_done:
            self._release_when_done.discard(req.request_id)
            self.kv.free(req)
        elif req.hold_blocks and req.block_table:
            self.held[req.request_id] = req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or (self._in_flight is not None and self._in_flight.live())

    def step(self) -> list[RequestOutput]:
        """Schedule and enqueue a step; return the tokens of the step that finished (this one, or with
        asynchronous scheduling the one before)."""
        prev, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        if prev is not None and self._needs_history():
            outputs, prev = self._resolve(prev), None
        plan = self.scheduler.schedule()
        launched = self._launch(plan, prev) if not plan.is_empty else None
        if prev is not None:
            outputs = self._resolve(prev)
        if launched is not None:
            if self.async_scheduling:
                self._in_flight = launched
            else:
                outputs += self._resolve(launched)
        return outputs

    def execute(self, batch: StepBatch, prev_sampled: torch.Tensor | None = None,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """Run the model over one step (a TP gang's rank 0 also ships `batch` to its peers)."""
        return self.runner.forward(batch, prev_sampled, layer_hook)

    def _needs_history(self) -> bool:
        """Some request's sampling reads its whole output (penalties): it cannot be planned past a token the
        host has not read."""
        return any(r.sampling_params.has_penalties for r in self.scheduler.running)

    def take_step_times(self) -> list[tuple[float, int, int, bool]]:
        """The step times recorded since the last call (see `record_steps`)."""
        times, self._step_times = self._step_times, []
        return times

    def _launch(self, plan: SchedulerOutput, prev: _Launched | None) -> _Launched:
        """Build, run and sample one step without waiting for the device; pending inputs come from `prev`."""
        started = time.perf_counter() if self.record_steps else 0.0
        sampling = [req for req, n in plan.scheduled if req.num_computed_tokens + n == req.num_tokens]
        num_prev = len(prev.sampling) if prev is not None else 0
        # Requests that hold their blocks sample once: their prompt's KV is complete with this step.
        saving = [req for req in sampling if req.hold_blocks]
        layer_hook = self.kv_saver.begin(saving) if saving and self.kv_saver is not None else None
        logits = self.execute(StepBatch.build(plan, self.config.block_size, num_prev),
                              prev.sampled if prev is not None else None, layer_hook)
        out = self.runner.sample(logits, sampling) if sampling else None
        # every row one token after an output token: a decode step (a prompt's last 1-token chunk is not)
        shape = (len(plan.scheduled), plan.num_tokens, all(n == 1 and (req.output_token_ids or req.num_pending)
                                                          for req, n in plan.scheduled)) if self.record_steps else None
        self.scheduler.launched(plan, sampling)
        launched = self._copy_to_host(sampling, out)
        if shape is not None:
            launched.started, launched.shape = started, shape
        return launched

    def _copy_to_host(self, sampling: list[Request], out: SamplerOutput | None) -> _Launched:
        """Start the copies of the sampled ids (and logprobs) to the host; CUDA: pinned, not awaited."""
        if out is None:
            return _Launched(sampling, None, None, None, None)
        if out.token_ids.device.type != "cuda":
            return _Launched(sampling, out.token_ids, out.token_ids, out.logprobs, None)
        lp = out.logprobs
        if lp is not None:  # non_blocking copies to the host land in pinned memory
            lp = Logprobs(*(t.to("cpu", non_blocking=True) for t in (lp.token_logprobs, lp.top_token_ids,
                                                                     lp.top_logprobs)))
        tokens = out.token_ids.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(sampling, out.token_ids, tokens, lp, ready)

    def _resolve(self, step: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for the device if it is still running) and hand them out."""
        if step.tokens is None:  # only partial prompt chunks (not waited for: the next step's time holds theirs)
            self._step_done(step)
            return []
        if step.ready is not None:
            step.ready.synchronize()
        self._step_done(step)
        tokens = step.tokens.tolist()
        rows = _logprob_rows(step.logprobs, [req.sampling_params.logprobs for req in step.sampling])
        logprobs = dict(zip(step.sampling, rows))
        kept, finished = self.scheduler.resolve(list(zip(step.sampling, tokens)))
        done = set(finished)
        results = []
        for req, tok in kept:
            results.append(RequestOutput(req.request_id, [tok], req in done,
                                         req.status.value if req in done else None, logprobs[req]))
            if req in done:
                self.requests.pop(req.request_id, None)
                self._hold(req)
        return results

    def _step_done(self, step: _Launched) -> None:
        if self.record_steps:
            now = time.perf_counter()
            self._step_times.append((now - max(step.started, self._last_resolved), *step.shape))
            self._last_resolved = now

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; return each one's generated token ids."""
        return run_to_completion(self, prompts, params)


def run_to_completion(engine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]):
    """Drive anything with `add_request` / `step` / `has_unfinished` (an engine, a TP gang) to the end."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id] += o.new_token_ids
    return [outputs[i] for i in ids]


def _logprob_rows(lp: Logprobs | None, wanted: list[int | None]) -> list[list[dict]]:
    """Each row's logprobs entry ([] where not asked for). NOTE: one copy to the host per field for the
    whole batch; indexing the device tensors row by row would sync once per row."""
    if lp is None:
        return [[] for _ in wanted]
    chosen, top_ids, top_lps = lp.token_logprobs.tolist(), lp.top_token_ids.tolist(), lp.top_logprobs.tolist()
    return [[] if k is None else [{"token_logprob": chosen[i], "top": dict(zip(top_ids[i][:k], top_lps[i][:k]))}]
            for i, k in enumerate(wanted)]
