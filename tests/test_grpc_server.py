"""The gRPC front door (router/server_grpc.py) and its client (router/client.py) over a scripted core:
streaming, conversion, status codes, cancellation and deadlines.

A real grpc.aio server on loopback runs on an event loop in a thread; the tests talk to it with the
blocking client, as `pdserve generate --url` does. The fake core's behaviour is picked by the prompt.
"""
from __future__ import annotations

import time

import grpc
import pytest
from grpc_support import CLOSE_BOUND_S, MODEL_INFO, FakeCore, ServerThread, expect_error, raw_generate

from pdserve.api import pdserve_pb2 as pb
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ErrorCode
from pdserve.router.client import (
    Completion,
    RemoteError,
    abort_request,
    build_request,
    generate_text,
    get_model_info,
    stream_generate,
)
from pdserve.router.frontend import ChatMessage, Usage

MAX_REQUEST_BYTES = 4096


@pytest.fixture(scope="module")
def servers():
    st = ServerThread()
    yield st
    st.close()


@pytest.fixture(scope="module")
def core():
    return FakeCore()


@pytest.fixture(scope="module")
def url(servers, core):
    return servers.serve(core, max_request_bytes=MAX_REQUEST_BYTES)[1]


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


def test_unset_sampling_fields_take_the_defaults(servers, url, core):
    list(stream_generate(url, text="hello"))
    assert core.requests[-1].params == SamplingParams(max_tokens=16) and core.requests[-1].stop == ()
    _, limited = servers.serve(core, max_tokens_limit=8)  # limits.max_tokens below vLLM's default
    list(stream_generate(limited, text="hello"))
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


def test_client_cancel_mid_flood_closes_the_core_iterator(url, core):
    stream = stream_generate(url, text="flood", request_id="flood")
    for _ in range(100):
        next(stream)
    stream.close()
    assert core.closed["flood"].wait(CLOSE_BOUND_S)


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
