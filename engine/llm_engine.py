"""The in-process engine: requests in, tokens out, one `step` at a time."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from pdserve.config import DeploymentConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_runner import ModelRunner, pick_device
from pdserve.engine.model_source import resolve_model
from pdserve.engine.parallel import SINGLE
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import Logprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.step import StepBatch
from pdserve.errors import InvalidRequestError


@dataclass
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort"
    logprobs: list[dict] = field(default_factory=list)


class LLMEngine:
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

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; it joins the running batch at the next step."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        self._check_prompt(prompt_token_ids)
        gen = None
        if params.seed is not None and not params.is_greedy:
            gen = torch.Generator(self.runner.device).manual_seed(params.seed)
        req = Request(request_id, list(prompt_token_ids), params, self.spec.eos_token_ids, generator=gen)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

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
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        sampling = [req for req, n in plan.scheduled if req.num_computed_tokens + n == req.num_tokens]
        logits = self.execute(StepBatch.build(plan, self.config.block_size))
        if not sampling:  # only partial prompt chunks this step
            self.scheduler.update(plan, {})
            return []
        out = self.runner.sample(logits, sampling)
        tokens = out.token_ids.tolist()  # the step's one host sync
        finished = self.scheduler.update(plan, dict(zip(sampling, tokens)))
        return self._outputs(sampling, tokens, finished, out.logprobs)

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run the model over one step (a TP gang's rank 0 also ships `batch` to its peers)."""
        return self.runner.forward(batch)

    def _outputs(self, sampling: list[Request], tokens: list[int], finished: list[Request],
                 logprobs: Logprobs | None) -> list[RequestOutput]:
        done = set(finished)
        results = []
        rows = _logprob_rows(logprobs, [req.sampling_params.logprobs for req in sampling])
        for req, tok, lp in zip(sampling, tokens, rows):
            results.append(RequestOutput(req.request_id, [tok], req in done,
                                         req.status.value if req in done else None, lp))
            if req in done:
                self.requests.pop(req.request_id, None)
        return results

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
