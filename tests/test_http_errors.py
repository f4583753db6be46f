"""Bad input, core errors, disconnects and the server's lifecycle, on a real server over a scripted core."""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from http_support import API_KEY, HANG, MAX_REQUEST_BYTES, MODEL, FakeCore, ServerThread, default_script
from pdserve.errors import InvalidRequestError, ResourceExhaustedError, WorkerFailedError

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(FakeCore(), api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES)
    yield srv
    srv.stop()


@pytest.fixture
def core(server):
    server.core.__init__()
    return server.core


def post(server, path: str, body=None, content: bytes | None = None, headers=AUTH) -> httpx.Response:
    if content is not None:
        return httpx.post(server.url + path, content=content, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers)


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": CHAT, **fields}


def completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Paris is", **fields}


BAD = [  # (path, body, status, param, words in the message)
    ("/v1/chat/completions", chat(temperature="hot"), 400, "temperature", "number"),
    ("/v1/chat/completions", chat(temperature=-0.5), 400, "temperature", ">= 0"),
    ("/v1/chat/completions", chat(top_p=0), 400, "top_p", "(0, 1]"),
    ("/v1/chat/completions", chat(top_p=1.5), 400, "top_p", "(0, 1]"),
    ("/v1/chat/completions", chat(max_tokens=-1), 400, "max_tokens", ">= 1"),
    ("/v1/chat/completions", chat(max_completion_tokens=0), 400, "max_completion_tokens", ">= 1"),
    ("/v1/chat/completions", chat(stream="yes"), 400, "stream", "boolean"),
    ("/v1/chat/completions", chat(messages="hi"), 400, "messages", "array"),
    ("/v1/chat/completions", chat(messages=[]), 400, "messages", "empty"),
    ("/v1/chat/completions", chat(messages=[{"content": "x"}]), 400, "messages[0].role", "required"),
    ("/v1/chat/completions", chat(top_logprobs=3), 400, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs", "<= 20"),
    ("/v1/chat/completions", chat(n=0), 400, "n", "greater than"),
    ("/v1/chat/completions", {"messages": CHAT, "model": 5}, 400, "model", "string"),
    ("/v1/completions", completion(prompt=""), 400, "prompt", "empty"),
    ("/v1/completions", completion(prompt=[]), 400, "prompt", "empty"),
    ("/v1/completions", completion(prompt=["a", "b"]), 400, "prompt", "one prompt"),
    ("/v1/completions", completion(prompt=[1, "a"]), 400, "prompt[1]", "integer"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt", "required"),
    ("/v1/completions", completion(max_tokens=-1), 400, "max_tokens", ">= 1"),
    ("/v1/completions", completion(stop=["", "x"]), 400, "stop", "empty"),
    ("/v1/completions", completion(echo=True), 400, "echo", "not supported"),
    ("/v1/completions", completion(seed=1.5), 400, "seed", "integer"),
    ("/v1/completions", completion(model="gpt-4"), 404, "model", "gpt-4"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0].type", "'text'"),
]


@pytest.mark.parametrize("path,body,status,param,words", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(server, core, path, body, status, param, words):
    r = post(server, path, body)
    error = r.json()["error"]
    assert r.status_code == status, error
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error" and core.requests == []
    if status == 404:
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize("content", [b'{"model": "fake-model", "messages": [', b"", b"model=x", b'{"a": "\xff"}'])
def test_malformed_json(server, core, content):
    r = post(server, "/v1/chat/completions", content=content)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "invalid_json"


def test_json_without_its_content_type(server, core):  # `curl -d` sends a form's
    r = httpx.post(server.url + "/v1/completions", content=json.dumps(completion()).encode(), headers=AUTH)
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["text"]


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(server, "/v1/chat/completions", chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/health", "/metrics"):  # open without a key: probes and scrapers
        assert httpx.get(server.url + path).status_code == 200


def test_oversized_body(server, core):
    big = chat(messages=[{"role": "user", "content": "x" * MAX_REQUEST_BYTES}])
    r = post(server, "/v1/chat/completions", big)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b" " * 1024

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert core.requests == []


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("error,status,code", [
    (ResourceExhaustedError("the queue is full (1024 requests)"), 429, "resource_exhausted"),
    (WorkerFailedError("no healthy decode worker"), 503, "unavailable"),
    (InvalidRequestError("prompt has 5000 tokens, over the limit of 4096"), 400, "invalid_argument"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_core_errors_get_their_status(server, core, error, status, code, stream):
    core.script = lambda request: [error]
    r = post(server, "/v1/completions", completion(stream=stream))
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert r.json()["error"]["message"] == error.message


def test_error_after_stream_started(server, core):
    core.script = lambda request: [*default_script(request)[:1], WorkerFailedError("decode worker 0 died")]
    r = post(server, "/v1/chat/completions", chat(stream=True))
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "unavailable" and error["message"] == "decode worker 0 died"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.APIError, match="decode worker 0 died"):
        list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True))


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_closes_the_core_iterator(server, core, stream):
    core.script = lambda request: [*default_script(request)[:1], HANG]
    sock = socket.create_connection(("127.0.0.1", server.server.port))
    body = json.dumps(completion(stream=stream)).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    if stream:  # the stream started: its first event came
        received = b""
        while b"The capital" not in received:
            received += sock.recv(65536)
    else:  # the core has the request: the answer is being awaited
        deadline = time.monotonic() + 2.0
        while not core.requests and time.monotonic() < deadline:
            time.sleep(0.01)
    sock.close()
    assert core.wait_closed("cmpl-", timeout_s=2.0) < 2.0


def test_bad_requests_leave_other_streams_alone(server, core):
    core.delay_s = 0.01
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)
    texts = [None] * 8

    def stream(i):
        chunks = client.completions.create(model=MODEL, prompt="x", seed=i, stream=True)
        texts[i] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for path, body, status, *_ in BAD:
        assert post(server, path, body).status_code == status
    for t in threads:
        t.join(10)
    assert texts == [f"The capital of France is Paris (seed {i})." for i in range(8)]
    assert core.closed == []


def test_port_zero_and_stop():
    core = FakeCore()
    core.script = lambda request: [*default_script(request)[:1], HANG]
    srv = ServerThread(core)
    assert srv.server.port > 0 and httpx.get(srv.url + "/v1/models").status_code == 200  # no key set: open
    with httpx.stream("POST", srv.url + "/v1/completions", json=completion(stream=True)) as r:
        next(r.iter_lines())  # a stream is open, its request hangs in the core
        start = time.monotonic()
        srv.call(srv.server.stop(grace_s=0.5))
        assert time.monotonic() - start < 2.0
    assert core.wait_closed("cmpl-", timeout_s=1.0) < 1.0
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")
