"""Typed messages between the router and the workers (one file, plain dataclasses).

What the router asks: reserve blocks for a prompt (decode), prefill a prompt and ship its KV (prefill),
start decoding once prefill's first token is known (decode), run a whole request (colocated), abort.
What a worker answers: one `WorkerReport` per long-poll, carrying every sequence's new tokens since the
previous poll (never one call per token), the requests that failed on it, and its load.
Workers never see the router's request objects; the router never sees an engine's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer import Destination


@dataclass(frozen=True)
class KVTarget:
    """Where a prefill worker ships one prompt's KV: the decode gang, its reserved blocks, the transfer id
    both sides agreed on (the router hands out ids)."""

    transfer_id: int
    destination: Destination
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class PrefillTask:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams  # the request's own; the worker samples only the first token
    target: KVTarget


@dataclass(frozen=True)
class Reservation:
    """A decode worker's answer to `reserve`: a lease on `block_ids` until the KV arrives or it expires."""

    request_id: str
    transfer_id: int
    destination: Destination
    block_ids: tuple[int, ...]


@dataclass
class TokenOutput:
    """New tokens of one sequence since the previous report; `finish_reason` on its last."""

    request_id: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort"
    logprobs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RequestFailure:
    """A request that cannot go on on this worker (its transfer failed, its lease expired, ...)."""

    request_id: str
    code: str  # an ErrorCode name
    message: str
    retry: bool = False  # the router may run the request again elsewhere (a KV transfer failed)


@dataclass(frozen=True)
class TransferOutcome:
    """How one KV transfer ended, as the reporting side saw it (for metrics)."""

    request_id: str
    ok: bool
    num_bytes: int
    seconds: float


@dataclass(frozen=True)
class StepTiming:
    """One engine step as the engine's loop saw it: from its launch (or the previous step's end, if later)
    to its tokens being read (`LLMEngine.record_steps`); in steady state, the time between two steps."""

    seconds: float
    num_seqs: int
    num_tokens: int
    decode: bool  # every sequence computed one token after an output token (no prompt tokens in the step)

    @property
    def phase(self) -> str:
        return "decode" if self.decode else "prefill"


@dataclass(frozen=True)
class WorkerLoad:
    running: int
    waiting: int  # queued for compute, plus (decode) reservations waiting for their KV
    free_blocks: int
    total_blocks: int
    queued_tokens: int  # prompt tokens not computed yet (prefill routing)
    preemptions: int


@dataclass
class WorkerReport:
    outputs: list[TokenOutput]
    failures: list[RequestFailure]
    transfers: list[TransferOutcome]
    load: WorkerLoad
    steps: list[StepTiming] = field(default_factory=list)  # the steps since the previous report


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the router once it is up."""

    name: str
    role: str  # "prefill", "decode", "colocated"
    node_id: str
    pid: int
    num_blocks: int
    max_model_len: int
