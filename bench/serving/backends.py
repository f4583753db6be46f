"""How one request is sent and timed: OpenAI-compatible HTTP streaming (any such server) or our gRPC API.

A backend's `send` never raises for a failed request: the result carries the error's kind (e.g.
`http_429`, `grpc_RESOURCE_EXHAUSTED`, `timeout`, `connect`), so a run counts errors by kind.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import httpx

from pdserve.bench.serving.workloads import BenchRequest


@dataclass
class RequestResult:
    """One request's timings (seconds, from when it was sent) and token counts."""

    prompt_len: int
    output_len: int = 0  # tokens received
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first
    e2e_s: float | None = None
    error: str | None = None  # the error's kind; None: success

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None for one-token outputs and failures)."""
        if not self.ok or self.output_len < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)


class Backend(Protocol):
    """Sends one request, streaming, and times it."""

    async def send(self, req: BenchRequest) -> RequestResult: ...

    async def close(self) -> None: ...


class _Timer:
    """Chunk arrival times of one streamed request."""

    def __init__(self, result: RequestResult):
        self.result, self.start = result, time.perf_counter()
        self.last: float | None = None

    def chunk(self, num_tokens: int) -> None:
        now = time.perf_counter()
        if num_tokens <= 0:
            return
        if self.last is None:
            self.result.ttft_s = now - self.start
        else:
            self.result.itl_s.append(now - self.last)
        self.last = now
        self.result.output_len += num_tokens

    def done(self) -> RequestResult:
        self.result.e2e_s = time.perf_counter() - self.start
        if self.result.ttft_s is None and self.result.error is None:
            self.result.error = "no_tokens"
        return self.result


class OpenAIBackend:
    """`POST {base_url}/v1/completions` with `stream: true` and the prompt as token ids (or as its text, where
    the request carries one); usage (when the server sends it) gives the exact output token count, otherwise
    each content chunk counts one token. `ignore_eos=False` leaves the field out, for servers that refuse it."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 timeout_s: float = 600.0, max_connections: int = 4096, ignore_eos: bool = True):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, limits=limits,
                                        timeout=httpx.Timeout(timeout_s, connect=30.0))
        self.model, self.ignore_eos = model, ignore_eos

    def body(self, req: BenchRequest) -> dict:
        prompt = req.prompt_ids if req.prompt_text is None else req.prompt_text
        body = {"prompt": prompt, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body if self.model is None else {**body, "model": self.model}

    async def send(self, req: BenchRequest) -> RequestResult:
        timer = _Timer(RequestResult(req.prompt_len))
        usage = None
        try:
            async with self.client.stream("POST", "/v1/completions", json=self.body(req)) as resp:
                if resp.status_code != 200:
                    timer.result.error = f"http_{resp.status_code}"
                    return timer.done()
                async for line in resp.aiter_lines():
                    usage = self._line(line, timer) or usage
        except httpx.TimeoutException:
            timer.result.error = "timeout"
        except httpx.TransportError as e:
            timer.result.error = "connect" if isinstance(e, httpx.ConnectError) else "transport"
        if usage is not None:
            timer.result.output_len = usage
        return timer.done()

    @staticmethod
    def _line(line: str, timer: _Timer) -> int | None:
        """Count one SSE line; the completion token count when it carries usage."""
        if not line.startswith("data:") or line.endswith("[DONE]"):
            return None
        chunk = json.loads(line[5:])
        if "error" in chunk:
            timer.result.error = "stream_error"
            return None
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
            timer.chunk(1)
        usage = chunk.get("usage")
        return usage.get("completion_tokens") if usage else None

    async def close(self) -> None:
        await self.client.aclose()


class GrpcBackend:
    """pdserve.v1.Generation/Generate over one `grpc.aio` channel; token counts are exact (token ids)."""

    def __init__(self, address: str, api_key: str | None = None, timeout_s: float = 600.0):
        from pdserve.api.pdserve_pb2_grpc import GenerationStub

        self.channel = grpc.aio.insecure_channel(address)
        self.stub = GenerationStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    async def send(self, req: BenchRequest) -> RequestResult:
        from pdserve.router.client import build_request

        prompt = {"token_ids": req.prompt_ids} if req.prompt_text is None else {"text": req.prompt_text}
        request = build_request(**prompt, sampling={"max_tokens": req.output_len, "temperature": 0.0,
                                                    "ignore_eos": True})
        timer = _Timer(RequestResult(req.prompt_len))
        try:
            async for msg in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s):
                timer.chunk(len(msg.token_ids))
        except grpc.aio.AioRpcError as e:
            timer.result.error = "timeout" if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED else f"grpc_{e.code().name}"
        return timer.done()

    async def close(self) -> None:
        await self.channel.close()


def make_backend(kind: str, url: str, model: str | None = None, api_key: str | None = None,
                 ignore_eos: bool = True) -> Backend:
    """`kind` "openai" (url: http://host:port) or "grpc" (url: host:port)."""
    if kind == "openai":
        return OpenAIBackend(url, model=model, api_key=api_key, ignore_eos=ignore_eos)
    if kind == "grpc":
        return GrpcBackend(url, api_key=api_key)
    raise ValueError(f"backend: unknown kind {kind!r} (openai or grpc)")
