"""The gRPC tests' scaffolding: a scripted RouterCore, a server loop in a thread, client helpers."""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pdserve.api import pdserve_pb2 as pb
from pdserve.api import pdserve_pb2_grpc as pb_grpc
from pdserve.errors import ErrorCode, PdserveError
from pdserve.router.client import RemoteError
from pdserve.router.frontend import GenerateDelta, GenerateInput, ModelInfo, Usage
from pdserve.router.server_grpc import GrpcServer, start_grpc_server

MODEL_INFO = ModelInfo(model="fake-model", max_model_len=2048, vocab_size=256, eos_token_ids=(2,))
CLOSE_BOUND_S = 5.0  # a cancelled or expired call reaches the core within this


def scripted_error(name: str) -> PdserveError:
    err = type(f"Scripted{name}", (PdserveError,), {"code": ErrorCode[name]})
    return err(f"scripted {name.lower()}")


class FakeCore:
    """A RouterCore whose requests follow the prompt: "hello" streams two deltas, "hang" one and then
    waits forever, "flood" streams deltas without end, "refuse-at-once" raises from `generate` itself,
    "error:<CODE>" raises at once, "late-error:<CODE>" after one delta, "crash" raises a plain exception,
    "logprobs" streams logprobs; anything else streams as "hello" does."""

    def __init__(self, serving: bool | None = True):  # None: is_serving() raises
        self.serving = serving
        self.requests: list[GenerateInput] = []
        self.closed: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.aborted: list[str] = []
        self.iterators: list = []

    def model_info(self) -> ModelInfo:
        return MODEL_INFO

    def is_serving(self) -> bool:
        if self.serving is None:
            raise RuntimeError("the probe itself failed")
        return self.serving

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return request_id == "running"

    def generate(self, request: GenerateInput):
        self.requests.append(request)
        if request.text == "refuse-at-once":  # a core may refuse before it hands out an iterator
            raise scripted_error("RESOURCE_EXHAUSTED")
        iterator = self._run(request)
        self.iterators.append(iterator)  # held, as a core may: only an explicit close reaches its `finally`
        return iterator

    async def _run(self, request: GenerateInput):
        prompt = request.text or ""
        try:
            if prompt.startswith("error:"):
                raise scripted_error(prompt.removeprefix("error:"))
            yield GenerateDelta(text="Hel", token_ids=[10, 11])
            while prompt == "flood":  # the handler is mostly writing, not waiting on the core
                yield GenerateDelta(text="x", token_ids=[1])
            if prompt == "hang":
                await asyncio.sleep(3600)
            if prompt.startswith("late-error:"):
                raise scripted_error(prompt.removeprefix("late-error:"))
            if prompt == "crash":
                raise RuntimeError("secret internal detail")
            logprobs = [{"token_logprob": -0.5, "top": {7: -2.0, 12: -0.5, 3: -1.0}}] if prompt == "logprobs" else []
            yield GenerateDelta(text="lo!", token_ids=[12], finish_reason="stop", usage=Usage(4, 3),
                                logprobs=logprobs)
        finally:
            self.closed[request.request_id].set()


class ServerThread:
    """An asyncio loop in a thread running gRPC servers; the tests' client calls block in the main thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[GrpcServer] = []

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, core, **kwargs) -> tuple[GrpcServer, str]:
        """start_grpc_server(core, **kwargs) on a free port: the server and its "host:port"."""
        server = self.run(start_grpc_server(core, **kwargs))
        self.servers.append(server)
        return server, f"127.0.0.1:{server.port}"

    def close(self):
        for server in self.servers:
            self.run(server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def raw_generate(url: str, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(url) as channel:
        return list(pb_grpc.GenerationStub(channel).Generate(request, timeout=10))


def expect_error(status: grpc.StatusCode, fn, *args, **kwargs) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterator):  # a stream fails when read
            list(result)
    assert info.value.status == status, info.value.message
    return info.value


def health_status(url: str, service: str = "") -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_for_health(url: str, status: int, service: str = "", bound_s: float = 3.0) -> int:
    deadline = time.monotonic() + bound_s
    while (got := health_status(url, service)) != status and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def reflected_services(url: str) -> list[str]:
    with grpc.insecure_channel(url) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())
