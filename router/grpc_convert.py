"""Between pdserve.v1's messages and the router core's (router/frontend.py), for the gRPC front door.

Every check here raises `InvalidRequestError` with a message that names the request's field.
"""
from __future__ import annotations

import uuid

from pdserve.api import pdserve_pb2 as pb
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from pdserve.router.frontend import ChatMessage, GenerateDelta, GenerateInput, ModelInfo

CHAT_ROLES = ("system", "user", "assistant")
# vLLM's default when a request names no max_tokens (bounded by the server's limit)
DEFAULT_MAX_TOKENS = 16
# SamplingParams fields that are proto3 `optional`: unset, SamplingParams' own default applies
_OPTIONAL_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logprobs",
)


def to_generate_input(request: pb.GenerateRequest, default_max_tokens: int) -> GenerateInput:
    """The core's request from the wire's; an empty `request_id` gets a fresh one."""
    text, token_ids, messages = None, None, None
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt: one of text, token_ids, messages must be set")
    if kind == "text":
        if not request.text:
            raise InvalidRequestError("text must not be empty")
        text = request.text
    elif kind == "token_ids":
        if not request.token_ids.ids:
            raise InvalidRequestError("token_ids must not be empty")
        token_ids = tuple(request.token_ids.ids)
    else:
        messages = _chat_messages(request.messages)
    return GenerateInput(
        request_id=request.request_id or uuid.uuid4().hex,
        params=to_sampling_params(request.sampling, default_max_tokens),
        text=text,
        token_ids=token_ids,
        messages=messages,
        stop=tuple(request.sampling.stop),
    )


def to_sampling_params(sampling: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Set fields as given, unset ones as SamplingParams' defaults; SamplingParams checks the values."""
    given = {name: getattr(sampling, name) for name in _OPTIONAL_FIELDS if sampling.HasField(name)}
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else default_max_tokens
    return SamplingParams(
        max_tokens=max_tokens, stop_token_ids=tuple(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos,
        **given,
    )


def _chat_messages(messages: pb.ChatMessages) -> tuple[ChatMessage, ...]:
    if not messages.messages:
        raise InvalidRequestError("messages must not be empty")
    for i, m in enumerate(messages.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
    return tuple(ChatMessage(role=m.role, content=m.content) for m in messages.messages)


def to_response(request_id: str, delta: GenerateDelta) -> pb.GenerateResponse:
    """One streamed message from one delta of the core."""
    response = pb.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, finish_reason=delta.finish_reason or "",
    )
    if delta.usage is not None:
        response.usage.prompt_tokens = delta.usage.prompt_tokens
        response.usage.completion_tokens = delta.usage.completion_tokens
    for token_id, entry in zip(delta.token_ids, delta.logprobs):
        top = sorted(entry["top"].items(), key=lambda kv: -kv[1])
        response.logprobs.append(pb.TokenLogprob(
            token_id=token_id, logprob=entry["token_logprob"],
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top],
        ))
    return response


def to_model_info(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
    )
