"""A blocking client of pdserve.v1.Generation: what `pdserve generate --url` and the tests use.

Failures come out as `RemoteError`, a `PdserveError` whose message is one line,
"<gRPC status>: <details>" (e.g. "UNAUTHENTICATED: missing or wrong API key ...").
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import grpc

from pdserve.api import pdserve_pb2 as pb
from pdserve.api import pdserve_pb2_grpc as pb_grpc
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError
from pdserve.router.frontend import ChatMessage, ModelInfo, Usage


class RemoteError(PdserveError):
    """An RPC ended with a non-OK status: `status` (grpc.StatusCode), `details` (the server's message);
    `code` is the ErrorCode of the same name (INTERNAL for statuses it lacks, e.g. UNAUTHENTICATED)."""

    def __init__(self, status: grpc.StatusCode, details: str):
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details
        self.code = ErrorCode.__members__.get(status.name, ErrorCode.INTERNAL)

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> RemoteError:
        return cls(err.code(), err.details() or "")


class Completion(NamedTuple):
    text: str
    finish_reason: str  # "stop", "length" or "abort"
    usage: Usage


def stream_generate(
    url: str,
    *,
    text: str | None = None,
    messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    sampling: Mapping[str, object] | None = None,
    request_id: str = "",
    api_key: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[pb.GenerateResponse]:
    """Stream one generation from the server at `url` ("host:port"): exactly one of `text`,
    `messages` ({"role", "content"} mappings or ChatMessage) or `token_ids`; `sampling` holds
    pdserve.v1.SamplingParams fields by name. Stopping the iteration early cancels the call (and the
    request on the server). `timeout_s` is the call's deadline (DEADLINE_EXCEEDED past it)."""
    request = build_request(text=text, messages=messages, token_ids=token_ids, sampling=sampling,
                            request_id=request_id)
    return _stream(url, request, _metadata(api_key), timeout_s)


def generate_text(url: str, **kwargs) -> Completion:
    """The whole completion of `stream_generate(url, **kwargs)`: text, finish reason, usage."""
    parts, last = [], None
    for last in stream_generate(url, **kwargs):
        parts.append(last.text)
    if last is None or not last.finish_reason:
        raise RemoteError(grpc.StatusCode.INTERNAL, "the stream ended without a finish reason")
    return Completion("".join(parts), last.finish_reason,
                      Usage(last.usage.prompt_tokens, last.usage.completion_tokens))


def get_model_info(url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> ModelInfo:
    info = _unary(url, lambda stub: stub.GetModelInfo, pb.GetModelInfoRequest(), api_key, timeout_s)
    return ModelInfo(model=info.model, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                     eos_token_ids=tuple(info.eos_token_ids))


def abort_request(url: str, request_id: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> bool:
    """Abort a running request by id; False if the server had no such request running."""
    return _unary(url, lambda stub: stub.Abort, pb.AbortRequest(request_id=request_id), api_key, timeout_s).aborted


def build_request(
    *,
    text: str | None = None,
    messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    sampling: Mapping[str, object] | None = None,
    request_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest; a wrong argument raises InvalidRequestError naming it (nothing is sent)."""
    if sum(p is not None for p in (text, messages, token_ids)) != 1:
        raise InvalidRequestError("exactly one of text, messages, token_ids must be given")
    request = pb.GenerateRequest(request_id=request_id, sampling=_sampling(sampling or {}))
    if text is not None:
        request.text = text
    elif token_ids is not None:
        request.token_ids.ids.extend(token_ids)
    else:
        for m in messages:
            role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (m["role"], m["content"])
            request.messages.messages.add(role=role, content=content)
        if not messages:  # an empty list still selects `messages` (the server refuses it, naming it)
            request.messages.SetInParent()
    return request


def _sampling(fields: Mapping[str, object]) -> pb.SamplingParams:
    sampling = pb.SamplingParams()
    known = pb.SamplingParams.DESCRIPTOR.fields_by_name
    for name, value in fields.items():
        if name not in known:
            raise InvalidRequestError(f"sampling: unknown field {name!r} (known: {', '.join(known)})")
        try:
            if isinstance(value, (list, tuple)):
                getattr(sampling, name).extend(value)
            else:
                setattr(sampling, name, value)
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidRequestError(f"sampling.{name}: {e}") from None
    return sampling


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _stream(url, request, metadata, timeout_s) -> Iterator[pb.GenerateResponse]:
    with grpc.insecure_channel(url) as channel:
        call = pb_grpc.GenerationStub(channel).Generate(request, metadata=metadata, timeout=timeout_s)
        try:
            yield from call
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e) from None
        finally:
            call.cancel()  # the caller stopped early (a no-op after the last message)


def _unary(url, pick, request, api_key, timeout_s):
    """`pick(stub)` is the unary method to call."""
    with grpc.insecure_channel(url) as channel:
        try:
            return pick(pb_grpc.GenerationStub(channel))(request, metadata=_metadata(api_key), timeout=timeout_s)
        except grpc.RpcError as e:
            raise RemoteError.from_rpc(e) from None
