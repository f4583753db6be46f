"""What the front doors (gRPC, HTTP) ask of the router core, and what it streams back.

A front door validates and converts its own wire format into a `GenerateInput`, then
iterates `RouterCore.generate(...)`: each `GenerateDelta` carries the new text and token
ids since the previous one; the last one has `finish_reason` and `usage`. Errors are
`pdserve.errors.PdserveError` subclasses raised from the iterator (their `code` maps to a
gRPC status and an HTTP status). Closing the iterator early (client cancel, disconnect,
deadline) aborts the request wherever it is.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from pdserve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user", "assistant" (anything else: INVALID_ARGUMENT naming the role)
    content: str


@dataclass(frozen=True)
class GenerateInput:
    """One request as the core takes it: exactly one of `text` / `token_ids` / `messages`.

    `text` is tokenized as given (no chat template); `messages` go through the tokenizer's chat
    template with the generation prompt added. `stop` strings end the request when they appear in
    the output text; the text streamed stops before them (OpenAI semantics).
    """

    request_id: str
    params: SamplingParams
    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerateDelta:
    text: str  # new text since the previous delta (may be "" while a multi-byte character is incomplete)
    token_ids: list[int]  # new token ids since the previous delta
    finish_reason: str | None = None  # on the last delta only: "stop", "length", "abort"
    usage: Usage | None = None  # on the last delta only
    # One entry per token in `token_ids` when SamplingParams.logprobs is set:
    # {"token_logprob": float, "top": {token_id: logprob}}
    logprobs: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo:
    model: str  # the served model's name (what clients pass as `model`)
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]


class RouterCore(Protocol):
    """The router as the front doors see it (router/core.py implements it)."""

    def model_info(self) -> ModelInfo: ...

    def generate(self, request: GenerateInput) -> AsyncIterator[GenerateDelta]:
        """Validate, admit and run `request`; raises PdserveError (INVALID_ARGUMENT, RESOURCE_EXHAUSTED,
        UNAVAILABLE, ...) from the iterator. Closing the iterator aborts the request."""
        ...

    def token_text(self, token_id: int) -> str:
        """One token decoded alone (special tokens too), for logprobs: OpenAI's `token` strings."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Abort a running request by id; False if no such request is running."""
        ...

    def is_serving(self) -> bool:
        """Every pool has a healthy worker and the server is not draining."""
        ...

    def status(self) -> dict:
        """Pools and workers: {"pools": [{"role", "workers": [{"name", "node", "pid", "healthy",
        "kv_blocks_used", "kv_blocks_total", "running", "waiting"}]}], "queued": int}"""
        ...
