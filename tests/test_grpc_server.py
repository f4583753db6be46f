"""The gRPC front door (router/server_grpc.py) and its client (router/client.py) over a scripted core.

A real grpc.aio server on loopback runs on an event loop in a thread; the tests talk to it with the
blocking client, as `pdserve generate --url` does. The fake core's behaviour is picked by the prompt.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_tools import protoc

import pdserve.api
from pdserve.api import pdserve_pb2 as pb
from pdserve.api import pdserve_pb2_grpc as pb_grpc
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError
from pdserve.router.client import (
    Completion,
    RemoteError,
    abort_request,
    build_request,
    generate_text,
    get_model_info,
    stream_generate,
)
from pdserve.router.frontend import ChatMessage, GenerateDelta, GenerateInput, ModelInfo, Usage
from pdserve.router.server_grpc import start_grpc_server

MODEL_INFO = ModelInfo(model="fake-model", max_model_len=2048, vocab_size=256, eos_token_ids=(2,))
MAX_REQUEST_BYTES = 4096
API_KEY = "s3cret"
CLOSE_BOUND_S = 5.0  # a cancelled or expired call reaches the core within this


def scripted_error(name: str) -> PdserveError:
    err = type(f"Scripted{name}", (PdserveError,), {"code": ErrorCode[name]})
    return err(f"scripted {name.lower()}")


class FakeCore:
    """A RouterCore whose requests follow the prompt: "hello" streams two deltas, "hang" one and then
    waits forever, "refuse-at-once" raises from `generate` itself, "error:<CODE>" raises at once,
    "late-error:<CODE>" after one delta, "crash" raises a plain exception, "logprobs" streams logprobs;
    anything else streams as "hello" does."""

    def __init__(self, serving: bool = True):
        self.serving = serving
        self.requests: list[GenerateInput] = []
        self.closed: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        self.aborted: list[str] = []

    def model_info(self) -> ModelInfo:
        return MODEL_INFO

    def is_serving(self) -> bool:
        return self.serving

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return request_id == "running"

    def generate(self, request: GenerateInput):
        self.requests.append(request)
        if request.text == "refuse-at-once":  # a core may refuse before it hands out an iterator
            raise scripted_error("RESOURCE_EXHAUSTED")
        return self._run(request)

    async def _run(self, request: GenerateInput):
        prompt = request.text or ""
        try:
            if prompt.startswith("error:"):
                raise scripted_error(prompt.removeprefix("error:"))
            yield GenerateDelta(text="Hel", token_ids=[10, 11])
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


class LoopThread:
    """An asyncio loop in a thread, for the server; the tests' client calls block in the main thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def loop():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def serve(loop):
    """serve(core, **start_grpc_server kwargs) -> (server, "127.0.0.1:port"); all stopped at the end."""
    servers = []

    def start(core, **kwargs):
        server = loop.run(start_grpc_server(core, **kwargs))
        servers.append(server)
        return server, f"127.0.0.1:{server.port}"

    yield start
    for server in servers:
        loop.run(server.stop(0))


@pytest.fixture(scope="module")
def core():
    return FakeCore()


@pytest.fixture(scope="module")
def url(serve, core):
    return serve(core, max_request_bytes=MAX_REQUEST_BYTES)[1]


@pytest.fixture(scope="module")
def auth_url(serve, core):
    return serve(core, api_key=API_KEY, max_tokens_limit=8)[1]


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


def test_streams_deltas_with_usage_on_the_last(url, core):
    responses = list(stream_generate(url, text="hello", request_id="r-1"))
    assert [(r.text, list(r.token_ids), r.finish_reason) for r in responses] == [
        ("Hel", [10, 11], ""), ("lo!", [12], "stop"),
    ]
    assert not responses[0].HasField("usage")
    assert (responses[1].usage.prompt_tokens, responses[1].usage.completion_tokens) == (4, 3)
    assert {r.request_id for r in responses} == {"r-1"}
    assert core.requests[-1].request_id == "r-1" and core.closed["r-1"].is_set()


def test_generate_text_and_a_server_assigned_request_id(url, core):
    assert generate_text(url, text="hello") == Completion("Hello!", "stop", Usage(4, 3))
    assert len(core.requests[-1].request_id) == 32


def test_unset_sampling_fields_take_the_defaults(url, auth_url, core):
    list(stream_generate(url, text="hello"))
    assert core.requests[-1].params == SamplingParams(max_tokens=16) and core.requests[-1].stop == ()
    list(stream_generate(auth_url, text="hello", api_key=API_KEY))  # that server's limits.max_tokens is 8
    assert core.requests[-1].params.max_tokens == 8


def test_temperature_zero_is_greedy_and_every_field_arrives(url, core):
    sampling = dict(max_tokens=5, temperature=0.0, top_p=0.5, top_k=3, min_p=0.1, seed=-7, stop=["\n", "END"],
                    stop_token_ids=[4, 5], presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                    logprobs=0, ignore_eos=True)
    list(stream_generate(url, text="hello", sampling=sampling))
    expected = {k: v for k, v in sampling.items() if k != "stop"}
    assert core.requests[-1].params == SamplingParams(**{**expected, "stop_token_ids": (4, 5)})
    assert core.requests[-1].params.is_greedy and core.requests[-1].stop == ("\n", "END")


def test_token_ids_and_messages_reach_the_core(url, core):
    list(stream_generate(url, token_ids=[1, 2, 3]))
    assert core.requests[-1].token_ids == (1, 2, 3) and core.requests[-1].text is None
    list(stream_generate(url, messages=[{"role": "system", "content": "be brief"},
                                        ChatMessage("user", "What is the capital of France?")]))
    assert core.requests[-1].messages == (ChatMessage("system", "be brief"),
                                          ChatMessage("user", "What is the capital of France?"))


def test_logprobs_most_likely_first(url):
    last = list(stream_generate(url, text="logprobs", sampling={"logprobs": 3}))[-1]
    [entry] = last.logprobs
    assert (entry.token_id, entry.logprob) == (12, -0.5)
    assert [(t.token_id, t.logprob) for t in entry.top] == [(12, -0.5), (3, -1.0), (7, -2.0)]


@pytest.mark.parametrize(("sampling", "field"), [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_is_invalid_argument_naming_the_field(url, core, sampling, field):
    before = len(core.requests)
    err = expect_error(grpc.StatusCode.INVALID_ARGUMENT, stream_generate, url, text="hello", sampling=sampling)
    assert field in err.details and len(core.requests) == before


@pytest.mark.parametrize(("request_", "field"), [
    (pb.GenerateRequest(), "text, token_ids, messages"),
    (pb.GenerateRequest(text=""), "text"),
    (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
    (build_request(messages=[]), "messages"),
    (build_request(messages=[{"role": "user", "content": "hi"}, {"role": "bot", "content": "?"}]),
     "messages[1].role"),
])
def test_bad_prompt_is_invalid_argument_naming_the_field(url, request_, field):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(url, request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


@pytest.mark.parametrize("code", list(ErrorCode))
def test_core_errors_map_to_their_status(url, code):
    err = expect_error(grpc.StatusCode[code.grpc_name], stream_generate, url, text=f"error:{code.name}")
    assert err.details == f"scripted {code.name.lower()}"
    assert err.code is code and err.message.startswith(f"{code.grpc_name}: ")


def test_an_error_raised_by_the_call_itself_maps_too(url):
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, stream_generate, url, text="refuse-at-once")


def test_an_error_mid_stream_follows_the_messages_before_it(url):
    received = []
    with pytest.raises(RemoteError) as info:
        for response in stream_generate(url, text="late-error:UNAVAILABLE"):
            received.append(response.text)
    assert received == ["Hel"] and info.value.status == grpc.StatusCode.UNAVAILABLE


def test_an_unexpected_failure_is_internal_and_tells_nothing_inside(url):
    err = expect_error(grpc.StatusCode.INTERNAL, stream_generate, url, text="crash", request_id="boom")
    assert "secret" not in err.details and "boom" in err.details


def test_client_cancel_closes_the_core_iterator(url, core):
    stream = stream_generate(url, text="hang", request_id="cancel-me")
    assert next(stream).text == "Hel"
    time.sleep(0.2)
    assert not core.closed["cancel-me"].is_set()
    stream.close()  # the client stops reading: the call is cancelled
    assert core.closed["cancel-me"].wait(CLOSE_BOUND_S)


def test_client_deadline_is_deadline_exceeded_and_closes_the_core_iterator(url, core):
    start = time.monotonic()
    expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, stream_generate, url, text="hang", request_id="late",
                 timeout_s=0.5)
    assert time.monotonic() - start < CLOSE_BOUND_S
    assert core.closed["late"].wait(CLOSE_BOUND_S)


def test_an_oversize_request_is_refused(url, core):
    before = len(core.requests)
    expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, stream_generate, url, text="x" * 2 * MAX_REQUEST_BYTES)
    assert len(core.requests) == before
    assert generate_text(url, text="hello").finish_reason == "stop"  # the server goes on


def test_abort_and_model_info(url, core):
    assert abort_request(url, "running") is True
    assert abort_request(url, "unknown") is False
    assert core.aborted[-2:] == ["running", "unknown"]
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, abort_request, url, "")
    assert get_model_info(url) == MODEL_INFO


@pytest.mark.parametrize("key", [None, "wrong", API_KEY + "x"])
def test_a_missing_or_wrong_api_key_is_unauthenticated(auth_url, core, key):
    before = len(core.requests)
    err = expect_error(grpc.StatusCode.UNAUTHENTICATED, stream_generate, auth_url, text="hello", api_key=key)
    assert "API key" in err.details and len(core.requests) == before
    expect_error(grpc.StatusCode.UNAUTHENTICATED, get_model_info, auth_url, api_key=key)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, abort_request, auth_url, "running", api_key=key)


def test_the_right_api_key_passes_and_health_and_reflection_stay_open(auth_url):
    assert generate_text(auth_url, text="hello", api_key=API_KEY).text == "Hello!"
    assert get_model_info(auth_url, api_key=API_KEY) == MODEL_INFO
    assert health_status(auth_url) == health_pb2.HealthCheckResponse.SERVING
    assert "pdserve.v1.Generation" in reflected_services(auth_url)


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


def test_health_follows_the_core_and_set_serving(serve):
    core = FakeCore(serving=False)
    server, url = serve(core)
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", "pdserve.v1.Generation"):
        assert health_status(url, service) == not_serving
    core.serving = True
    for service in ("", "pdserve.v1.Generation"):
        assert wait_for_health(url, serving, service) == serving
    server.set_serving(False)  # draining: whatever the core says (from another thread, too)
    assert wait_for_health(url, not_serving) == not_serving
    server.set_serving(True)
    assert wait_for_health(url, serving) == serving


def test_reflection_describes_the_services(url):
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= set(reflected_services(url))
    with grpc.insecure_channel(url) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        service = DescriptorPool(db).FindServiceByName("pdserve.v1.Generation")
        generate = service.methods_by_name["Generate"]
        assert generate.output_type.full_name == "pdserve.v1.GenerateResponse"
        assert generate.server_streaming and not generate.client_streaming


def test_stop_closes_running_requests(loop, serve):
    core = FakeCore()
    server, url = serve(core)
    stream = stream_generate(url, text="hang", request_id="at-stop")
    assert next(stream).text == "Hel"
    loop.run(server.stop(0.1))
    assert core.closed["at-stop"].wait(CLOSE_BOUND_S)
    with pytest.raises(RemoteError):
        list(stream)


def test_client_side_checks_name_the_argument():
    with pytest.raises(InvalidRequestError, match="exactly one of text, messages, token_ids"):
        build_request(text="a", token_ids=[1])
    with pytest.raises(InvalidRequestError, match="unknown field 'temp'"):
        build_request(text="a", sampling={"temp": 0.5})
    with pytest.raises(InvalidRequestError, match=r"sampling\.max_tokens"):
        build_request(text="a", sampling={"max_tokens": -1})
    with pytest.raises(InvalidRequestError, match=r"sampling\.stop"):
        build_request(text="a", sampling={"stop": "END"})


def test_stubs_are_generated_from_the_proto(tmp_path):
    """pdserve_pb2.py describes pdserve.proto as it is (regenerate after an edit: the proto's header)."""
    out = tmp_path / "pdserve.pb"
    api = Path(pdserve.api.__file__).parent
    assert protoc.main(["protoc", f"-I{api}", f"--descriptor_set_out={out}", "pdserve.proto"]) == 0
    [compiled] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    stubs = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for fd in (compiled, stubs):  # newer protoc versions record json_name; the stubs' older one did not
        for message in fd.message_type:
            for field in message.field:
                field.ClearField("json_name")
    assert compiled == stubs
