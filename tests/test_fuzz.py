"""Malformed requests at both APIs of `pdserve serve` (the tiny model, disaggregated over gloo), seeded and
reproducible (tests/fuzz_support.py), while 8 greedy streams run beside them: every answer is the client's
error with a message (never a 5xx, INTERNAL or UNKNOWN), the streams' tokens are those of an undisturbed run,
slow bodies are cut off without holding anyone else, and every block is back in its pool after."""
from __future__ import annotations

import socket
import threading
import time

import grpc
import httpx
import pytest
from fuzz_support import API_KEY, AUTH, COMPLETIONS, grpc_cases, http_cases
from serving_support import GREEDY, MAX_TOKENS, collect, pools_full, tiny_config

from pdserve.api import pdserve_pb2 as pb
from pdserve.cluster.serve import ServerThread
from pdserve.router.client import RemoteError

SEED = 21
NUM_CASES = 240
MAX_REQUEST_BYTES = 1 << 20
BODY_TIMEOUT_S = 2.0
LIMITS = {"max_prompt_tokens": 200, "max_request_bytes": MAX_REQUEST_BYTES, "request_body_timeout_s": BODY_TIMEOUT_S,
          "max_concurrent_requests": 32, "max_queued_requests": 32}


@pytest.fixture(scope="module")
def server(path):
    router = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "api_key": API_KEY}
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo"}, router=router, limits=LIMITS)) as server:
        yield server


class Alongside:
    """8 greedy streams, each run again and again until `stop()`: the token ids each run gave."""

    def __init__(self, url: str, prompts: list[list[int]], num: int = 8):
        self.runs: list[tuple[int, list[int]]] = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._url, self._prompts = url, prompts
        self.threads = [threading.Thread(target=self._loop, args=(i % len(prompts),), daemon=True) for i in range(num)]
        for t in self.threads:
            t.start()

    def _loop(self, index: int):
        while not self._stop.is_set():
            try:
                ids, _, _ = collect(self._url, token_ids=self._prompts[index], api_key=API_KEY,
                                    sampling={**GREEDY, "max_tokens": MAX_TOKENS}, timeout_s=60)
                self.runs.append((index, ids))
            except RemoteError as e:
                self.errors.append(e)
                return

    def stop(self) -> Alongside:
        self._stop.set()
        for t in self.threads:
            t.join(60)
        return self


def _http_failures(url: str) -> list[tuple]:
    """Every case whose answer is not its expected 4xx with an OpenAI error body naming the problem."""
    failures = []
    with httpx.Client(timeout=30) as client:
        for case in http_cases(SEED, NUM_CASES, MAX_REQUEST_BYTES):
            r = client.request(case.method, url + case.path, content=case.content, headers=case.headers)
            try:
                error = r.json()["error"]
                shaped = set(error) == {"message", "type", "param", "code"} and case.words in error["message"]
            except (ValueError, KeyError, TypeError):
                shaped = False
            if r.status_code not in case.expect or not shaped:
                failures.append((case.kind, case.method, case.path, case.content[:100], r.status_code, r.text[:300]))
    return failures


def _grpc_failures(address: str) -> list[tuple]:
    """Every case whose call did not end with its expected status and a message naming the problem."""
    failures = []
    with grpc.insecure_channel(address) as channel:
        generate = channel.unary_stream(  # raw bytes go out as they are
            "/pdserve.v1.Generation/Generate", response_deserializer=pb.GenerateResponse.FromString,
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString())
        for case in grpc_cases(SEED, NUM_CASES, MAX_REQUEST_BYTES):
            metadata = (("authorization", f"Bearer {API_KEY}"),) if case.metadata_ok else ()
            try:
                answer = f"{len(list(generate(case.payload, metadata=metadata, timeout=30)))} messages"
            except grpc.RpcError as e:
                if e.code().name in case.expect and e.details() and case.words in e.details():
                    continue
                answer = f"{e.code().name}: {e.details()}"
            payload = case.payload if isinstance(case.payload, bytes) else str(case.payload)[:200]
            failures.append((case.kind, payload[:200], answer[:300]))
    return failures


@pytest.mark.parametrize("api", ["http", "grpc"])
def test_malformed_requests_are_the_clients_errors_and_streams_are_undisturbed(server, prompts, expected, api):
    streams = Alongside(server.grpc_address, prompts)
    failures = _http_failures(server.http_url) if api == "http" else _grpc_failures(server.grpc_address)
    streams.stop()
    assert failures == []
    assert streams.errors == []
    assert {i for i, _ in streams.runs} == set(range(len(prompts)))
    assert [ids for _, ids in streams.runs] == [expected[i] for i, _ in streams.runs]
    ids, finish, _ = collect(server.grpc_address, token_ids=prompts[1], api_key=API_KEY,
                             sampling={**GREEDY, "max_tokens": MAX_TOKENS})
    assert (ids, finish) == (expected[1], "length")
    assert pools_full(server) == []


class SlowClient:
    """A connection that sends its request's head, then the body's pieces one by one, slowly (or never);
    what the server answers is read as it comes (before more pieces could make the closed end reset it)."""

    def __init__(self, port: int, head: bytes, drip: list[bytes], every_s: float):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(head)
        self.answer, self.answered_at = b"", None
        self._answered = threading.Event()
        self._drip, self._every_s = drip, every_s
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._send, self._read)]
        for t in self.threads:
            t.start()

    def _send(self):
        for piece in self._drip:
            if self._answered.wait(self._every_s):
                return
            try:
                self.sock.sendall(piece)
            except OSError:
                return

    def _read(self):
        try:
            while chunk := self.sock.recv(65536):
                self.answer += chunk
                self.answered_at = self.answered_at or time.monotonic()
                self._answered.set()
        except OSError:
            pass
        self._answered.set()

    def close(self, bound_s: float) -> bytes:
        self.threads[1].join(bound_s)
        self.sock.close()
        return self.answer


def test_slow_bodies_get_408_and_hold_no_one(server, prompts, expected):
    port, head = server.http.port, (f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                    f"Authorization: {AUTH['Authorization']}\r\n")
    clients = [
        SlowClient(port, head.encode() + b"Content-Length: 200\r\n\r\n{\"prompt\"", [], 0),  # never finishes
        SlowClient(port, head.encode() + b"Content-Length: 2000\r\n\r\n", [b"{"] * 2000, 0.2),  # a byte at a time
        SlowClient(port, head.encode() + b"Transfer-Encoding: chunked\r\n\r\n", [b"1\r\n \r\n"] * 2000, 0.2),
    ]
    start = time.monotonic()
    r = httpx.post(server.http_url + COMPLETIONS, headers=AUTH, timeout=30, json={
        "prompt": prompts[1], "max_tokens": MAX_TOKENS, "logprobs": 0, "return_tokens_as_token_ids": True, **GREEDY})
    assert r.status_code == 200, r.text
    assert [int(t.removeprefix("token_id:")) for t in r.json()["choices"][0]["logprobs"]["tokens"]] == expected[1]
    assert time.monotonic() - start < BODY_TIMEOUT_S  # answered while the slow bodies were still open
    for client in clients:
        answer = client.close(10)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"request_timeout"' in answer and b"limits.request_body_timeout_s" in answer
        assert client.answered_at - start < BODY_TIMEOUT_S + 1
    assert pools_full(server) == []


@pytest.mark.parametrize("method, response", [("Abort", pb.AbortResponse), ("GetModelInfo", pb.ModelInfo)])
def test_unparsable_bytes_to_the_unary_methods_are_invalid_argument(server, method, response):
    with grpc.insecure_channel(server.grpc_address) as channel:
        call = channel.unary_unary(f"/pdserve.v1.Generation/{method}", response_deserializer=response.FromString)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\x7fab", metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("malformed pdserve.v1.")


RAISING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                    "{{ raise_exception('System message must be first') }}{% endif %}{{ m['content'] }}{% endfor %}")


def test_a_chat_template_that_refuses_the_messages_is_the_clients_error(server):
    hf = server.router.tokenizer.hf
    template, hf.chat_template = hf.chat_template, RAISING_TEMPLATE
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
    try:
        r = httpx.post(server.http_url + "/v1/chat/completions", headers=AUTH, timeout=30,
                       json={"messages": messages, "max_tokens": 2})
        with pytest.raises(RemoteError) as e:
            collect(server.grpc_address, messages=messages, api_key=API_KEY, sampling={"max_tokens": 2})
    finally:
        hf.chat_template = template
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("messages: the model's chat template refuses them: "
                                            "System message must be first")
    assert e.value.status.name == "INVALID_ARGUMENT" and "System message must be first" in e.value.details
