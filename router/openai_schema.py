"""The OpenAI-compatible HTTP API's request and response bodies, and their mapping onto the core's.

Requests are validated strictly (a string is not a number, `true` is not `1`), unknown fields are ignored
as OpenAI's API ignores `user` and the like, and values are checked once, by `SamplingParams`, whose
message names the field. What this API accepts beyond OpenAI's: vLLM's `top_k`, `min_p`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos` and `return_tokens_as_token_ids` (logprobs name each
token `token_id:<id>`, exact where a token's text alone is not, e.g. part of a multi-byte character).

- `prompt` (completions) is one prompt: a string or a list of token ids (a list holding exactly one of
  those is taken as that one); several prompts in one request are rejected (400), send one request each.
- `n > 1` runs n requests with ids `<id>-0` .. `<id>-<n-1>`; with a `seed`, choice i samples with
  `seed + i`, so the choices differ and each reproduces.
- An unset `max_tokens` is 16 for completions (OpenAI's default) and the server's limit for chat; a
  request still ends with "length" where the model's context is full.
"""
from __future__ import annotations

import re
import time
from dataclasses import fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.router.frontend import ChatMessage, GenerateInput

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 128


class ParamError(InvalidRequestError):
    """An invalid request value, with the OpenAI `param` it concerns."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """The fields both generation endpoints share."""

    model: str | None = None  # None: the served model
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: str
    content: str | list[TextPart] | None = None  # None: an assistant turn that said nothing


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; it wins
    logprobs: bool = False
    top_logprobs: int | None = None


# --- from requests to the core's inputs ---------------------------------------------------------

def completion_inputs(req: CompletionRequest, request_id: str) -> list[GenerateInput]:
    """One `GenerateInput` per choice; raises ParamError naming the offending field."""
    _reject_unsupported(req)
    if req.echo:
        raise ParamError("echo is not supported", "echo")
    if req.suffix:
        raise ParamError("suffix is not supported", "suffix")
    if req.best_of not in (None, req.n):
        raise ParamError("best_of must equal n when given (candidates are not ranked)", "best_of")
    prompt = _single_prompt(req.prompt)
    text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, tuple(prompt))
    max_tokens = req.max_tokens if req.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    return [
        GenerateInput(f"{request_id}-{i}", _sampling(req, i, max_tokens, "max_tokens", req.logprobs),
                      text=text, token_ids=token_ids, stop=_stop(req.stop))
        for i in range(req.n)
    ]


def chat_inputs(req: ChatCompletionRequest, request_id: str, default_max_tokens: int) -> list[GenerateInput]:
    """One `GenerateInput` per choice; raises ParamError naming the offending field."""
    _reject_unsupported(req)
    if not req.messages:
        raise ParamError("messages must not be empty", "messages")
    if req.top_logprobs is not None and not req.logprobs:
        raise ParamError("top_logprobs requires logprobs to be true", "top_logprobs")
    messages = tuple(ChatMessage(m.role, _content(m.content)) for m in req.messages)
    max_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return [
        GenerateInput(f"{request_id}-{i}",
                      _sampling(req, i, default_max_tokens if max_tokens is None else max_tokens, max_field, logprobs),
                      messages=messages, stop=_stop(req.stop))
        for i in range(req.n)
    ]


def _reject_unsupported(req: _SamplingRequest):
    if req.logit_bias:
        raise ParamError("logit_bias is not supported", "logit_bias")


def _single_prompt(prompt: str | list) -> str | list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise ParamError(f"prompt: one prompt per request is supported, got {len(prompt)}; send one request "
                             "per prompt", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise ParamError("prompt must not be empty", "prompt")
    return prompt


def _content(content: str | list[TextPart] | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or ""


def _stop(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(s == "" for s in stops):
        raise ParamError("stop strings must not be empty", "stop")
    return stops


_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_OPTIONAL_FLOATS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _sampling(req: _SamplingRequest, index: int, max_tokens: int, max_field: str,
              logprobs: int | None) -> SamplingParams:
    """Choice `index`'s parameters: unset fields keep SamplingParams' defaults; seed + index per choice."""
    given = {name: getattr(req, name) for name in _OPTIONAL_FLOATS if getattr(req, name) is not None}
    try:
        return SamplingParams(
            max_tokens=max_tokens, top_k=req.top_k, seed=None if req.seed is None else req.seed + index,
            stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos, logprobs=logprobs, **given)
    except InvalidRequestError as e:
        # SamplingParams' messages begin with the field's name; name it as the client spelled it.
        match = re.match(r"\w+", e.message)
        name = match.group(0) if match else ""
        param = {"max_tokens": max_field, "logprobs": "top_logprobs" if isinstance(req, ChatCompletionRequest)
                 else "logprobs"}.get(name, name)
        message = e.message if name == param else e.message.replace(name, param, 1)
        raise ParamError(message, param if name in _SAMPLING_FIELDS else None) from None


# --- responses -----------------------------------------------------------------------------------

class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = []


class ChatMessageOut(BaseModel):
    role: str | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pdserve"
    max_model_len: int


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
