"""The OpenAI-compatible HTTP API of `pdserve serve` end to end: real prefill/decode (gloo) and colocated
workers on a local Ray cluster, the tiny model's greedy tokens against transformers, disconnects, bad input
beside streams in flight, metrics, health and status."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from http_serving_support import API_KEY, HEADERS, Stream, complete, greedy_body, metric_samples, token_ids
from serving_support import MAX_TOKENS, pools_full, tiny_config

from conftest import hf_greedy
from pdserve.cluster.serve import ServerThread
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.status import fetch_status, format_status

LIMITS = {"max_prompt_tokens": 200, "max_request_bytes": 16384, "max_concurrent_requests": 8,
          "max_queued_requests": 2}
LONG = 64  # tokens of the streams kept in flight while bad requests come in
NUM_BLOCKS = 128


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for both deployments (starting one takes longer than serving all the tests)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module", params=["disaggregated", "colocated"])
def server(request, ray_cluster, path):
    disaggregated = request.param == "disaggregated"
    deployment = {"kv_transfer": {"transport": "gloo"}} if disaggregated else {"disaggregated": False}
    router = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "api_key": API_KEY}
    with ServerThread(tiny_config(path, router=router, limits=LIMITS, num_kv_blocks=NUM_BLOCKS,
                                  **deployment)) as server:
        yield server


@pytest.fixture(scope="module")
def expected_long(path, prompts):
    return hf_greedy(path, prompts, LONG, ignore_eos=True)


def test_greedy_completions_equal_transformers(server, path, prompts, expected):
    tok = load_tokenizer(path)
    for p, e in zip(prompts, expected):
        out = complete(server.http_url, greedy_body(p, MAX_TOKENS))
        (choice,) = out["choices"]
        assert token_ids(choice["logprobs"]) == e
        assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, tok.decode(e), "length")
        assert out["usage"] == {"prompt_tokens": len(p), "completion_tokens": MAX_TOKENS,
                                "total_tokens": len(p) + MAX_TOKENS}
    assert pools_full(server) == []


def test_n2_with_a_seed_is_indexed_and_reproducible(server, prompts):
    body = {"prompt": prompts[0], "max_tokens": MAX_TOKENS, "n": 2, "seed": 7, "temperature": 0.8,
            "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    runs = [complete(server.http_url, body) for _ in range(2)]
    for out in runs:
        assert [c["index"] for c in out["choices"]] == [0, 1]
        assert out["usage"]["completion_tokens"] == 2 * MAX_TOKENS
    first, again = ([(token_ids(c["logprobs"]), c["text"]) for c in out["choices"]] for out in runs)
    assert first == again and first[0][0] != first[1][0]
    assert pools_full(server) == []


def test_disconnect_mid_stream_frees_blocks_and_others_go_on(server, prompts, expected):
    url = server.http_url
    before = metric_samples(url)
    others = [Stream(url, greedy_body(p, MAX_TOKENS)) for p in prompts]
    # as long as the model allows; its client reads the first event and goes away, long before its end
    with _raw_post(url, greedy_body(prompts[1], _longest(server, prompts[1]), stream=True)) as victim, \
            victim.makefile("rb") as lines:  # NOTE: the connection closes once both are closed
        while not (line := lines.readline()).startswith(b"data: "):  # the status line, headers, ...
            assert line, "the victim's response ended before its first event"
        assert b'"token_id:' in line  # its first token came: the request runs
    assert [o.join().ids for o in others] == expected, [(o.finish, o.error) for o in others]
    assert pools_full(server) == []
    # the victim never finished: only the others count as served (aborts are neither finished nor errors)
    after = metric_samples(url)
    key = ("pdserve_requests_total", (("finish_reason", "length"),))
    assert after[key] - before.get(key, 0) == len(prompts)
    assert server.router.streams == {}


def _longest(server, prompt: list[int]) -> int:
    """The most tokens a request with `prompt` may ask for."""
    return min(w.info.max_model_len for w in server.router.workers) - len(prompt)


def _raw_post(url: str, body: dict) -> socket.socket:
    """A completion request sent on a raw connection, whose client can go away at a moment of its choosing."""
    address, data = httpx.URL(url), json.dumps(body).encode()
    sock = socket.create_connection((address.host, address.port), timeout=20)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnect_before_a_whole_response_aborts_it(server, prompts):
    url = server.http_url
    before = metric_samples(url)
    # as long an answer as the model allows; the client goes away once the request runs, long before its end
    with _raw_post(url, greedy_body(prompts[1], _longest(server, prompts[1]))):
        deadline = time.monotonic() + 20
        while not server.router.streams and time.monotonic() < deadline:
            time.sleep(0.002)
        assert server.router.streams, "the request never reached the router"
    assert pools_full(server) == []
    key = ("pdserve_requests_total", (("finish_reason", "length"),))
    assert metric_samples(url).get(key, 0) == before.get(key, 0) and server.router.streams == {}


def _bad_requests(max_prompt: int):
    ok = {"prompt": "hi", "max_tokens": 4}
    wrong_key = {"Authorization": "Bearer wrong"}
    return {  # name: (httpx.post arguments, status, code, param, what the message names)
        "malformed-json": ({"content": b'{"prompt": [1, 2'}, 400, "invalid_json", None, "not valid JSON"),
        "wrong-type": ({"json": {**ok, "max_tokens": "ten"}}, 400, "invalid_argument", "max_tokens",
                       "valid integer"),
        "chat-wrong-type": ({"json": {"messages": "hi"}, "path": "/v1/chat/completions"}, 400, "invalid_argument",
                            "messages", "valid array"),
        "empty-prompt": ({"json": {**ok, "prompt": ""}}, 400, "invalid_argument", "prompt", "must not be empty"),
        "prompt-over-limit": ({"json": {**ok, "prompt": [65] * (max_prompt + 1)}}, 400, "invalid_argument", None,
                              f"limits.max_prompt_tokens is {max_prompt}"),
        "negative-max-tokens": ({"json": {**ok, "max_tokens": -1}}, 400, "invalid_argument", "max_tokens",
                                "max_tokens"),
        "negative-temperature": ({"json": {**ok, "temperature": -0.5}}, 400, "invalid_argument", "temperature",
                                 "temperature"),
        "top-p-over-1": ({"json": {**ok, "top_p": 1.5}}, 400, "invalid_argument", "top_p", "top_p"),
        "top-p-zero": ({"json": {**ok, "top_p": 0.0}}, 400, "invalid_argument", "top_p", "top_p"),
        "unknown-model": ({"json": {**ok, "model": "gpt-4"}}, 404, "model_not_found", "model", "'gpt-4'"),
        "oversized-body": ({"json": {**ok, "suffix": "x" * LIMITS["max_request_bytes"]}}, 413, "request_too_large",
                           None, "limits.max_request_bytes"),
        "wrong-api-key": ({"json": ok, "headers": wrong_key}, 401, "invalid_api_key", None, "Incorrect API key"),
        "missing-api-key": ({"json": ok, "headers": {}}, 401, "invalid_api_key", None, "Missing API key"),
    }


def test_bad_input_is_answered_while_8_streams_complete(server, prompts, expected_long):
    url = server.http_url
    streams = [Stream(url, greedy_body(prompts[i % len(prompts)], LONG)) for i in range(8)]
    for s in streams:
        assert s.first.wait(30), s.error
    cases = _bad_requests(LIMITS["max_prompt_tokens"])
    # The workers are stopped while the bad requests come in: the streams are surely in flight, and the
    # answers surely come from the router alone.
    with _workers_stopped(server), ThreadPoolExecutor(len(cases)) as pool:
        answers = dict(zip(cases, pool.map(lambda case: _post(url, case[0]), cases.values())))
        assert [s.ended for s in streams] == [None] * 8
    wrong = {}
    for case, (_, status, code, param, named) in cases.items():
        r = answers[case]
        error = r.json()["error"]
        if (r.status_code, error["code"], error["param"]) != (status, code, param) or named not in error["message"] \
                or error["type"] != ("authentication_error" if status == 401 else "invalid_request_error"):
            wrong[case] = (r.status_code, error)
    assert wrong == {}
    assert [s.join().ids for s in streams] == [expected_long[i % len(prompts)] for i in range(8)]
    assert pools_full(server) == []


@contextlib.contextmanager
def _workers_stopped(server):
    pids = [w.info.pid for w in server.router.workers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _post(url: str, args: dict) -> httpx.Response:
    args = {"headers": HEADERS, **args}
    return httpx.post(url + args.pop("path", "/v1/completions"), **args, timeout=30)


def test_full_queue_is_429_at_once_and_the_rest_complete(server, prompts, expected_long):
    url = server.http_url
    before = metric_samples(url)
    with _workers_stopped(server):  # 8 run (waiting on the workers), 2 queue, 2 are refused without them
        streams = [Stream(url, greedy_body(prompts[i % len(prompts)], LONG)) for i in range(12)]
        deadline = time.monotonic() + 10
        while sum(s.ended is not None for s in streams) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [s for s in streams if s.ended is not None]
    assert len(refused) == 2
    for s in refused:
        error = json.loads(s.error["body"])["error"]
        assert (s.error["status"], error["type"], error["code"]) == (429, "rate_limit_error", "resource_exhausted")
        assert "max_queued_requests 2" in error["message"]
    served = [(s.join().ids, expected_long[i % len(prompts)]) for i, s in enumerate(streams) if s not in refused]
    assert len(served) == 10 and all(got == want for got, want in served)
    after = metric_samples(url)
    assert _delta(before, after, "pdserve_request_errors_total", kind="resource_exhausted") == 2
    assert pools_full(server) == []


def _delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_move_as_requests_are_served(server, prompts):
    url = server.http_url
    before = metric_samples(url)
    for p in prompts:
        complete(url, greedy_body(p, MAX_TOKENS))
    for bad in ({"prompt": "hi", "temperature": -1}, {"prompt": [65] * (LIMITS["max_prompt_tokens"] + 1)}):
        assert httpx.post(url + "/v1/completions", json=bad, headers=HEADERS).status_code == 400
    after = metric_samples(url)
    n = len(prompts)
    assert _delta(before, after, "pdserve_requests_total", finish_reason="length") == n
    assert _delta(before, after, "pdserve_prompt_tokens_total") == sum(map(len, prompts))
    assert _delta(before, after, "pdserve_generation_tokens_total") == n * MAX_TOKENS
    assert _delta(before, after, "pdserve_time_to_first_token_seconds_count") == n
    assert _delta(before, after, "pdserve_e2e_request_latency_seconds_count") == n
    # one refused by the front door (its schema), one by the core (the prompt limit)
    assert _delta(before, after, "pdserve_request_errors_total", kind="invalid_argument") == 2
    itl = _delta(before, after, "pdserve_inter_token_latency_seconds_count")
    disaggregated = server.config.disaggregated
    # disaggregated, the first delta is prefill's one token and every later token has a gap
    assert itl == n * (MAX_TOKENS - 1) if disaggregated else 0 < itl <= n * (MAX_TOKENS - 1)
    # every disaggregated request moved its prompt's KV once; a colocated one moves none
    transfers = n if disaggregated else 0
    assert _delta(before, after, "pdserve_kv_transfers_total") == transfers
    assert _delta(before, after, "pdserve_kv_transfer_seconds_count") == transfers
    assert _delta(before, after, "pdserve_kv_transfer_failures_total") == 0
    assert (_delta(before, after, "pdserve_kv_transfer_bytes_total") > 0) == disaggregated
    stages = ["queued", "leased", "prefilling", "transferring", "decoding"] if disaggregated else ["queued", "decoding"]
    for stage in stages:  # every finished request went through each stage once
        assert _delta(before, after, "pdserve_request_stage_seconds_count", stage=stage) == n
    # a step or more per prompt (long ones in chunks), then one per further token; each worker times its own
    prefill_role, decode_role = ("prefill", "decode") if disaggregated else ("colocated", "colocated")
    steps = "pdserve_engine_step_seconds_count"
    assert _delta(before, after, steps, phase="prefill", role=prefill_role) >= n
    assert _delta(before, after, steps, phase="decode", role=decode_role) == n * (MAX_TOKENS - 1)
    for w in server.router.workers:
        assert after[("pdserve_kv_blocks_total", (("role", w.role), ("worker", w.name)))] == NUM_BLOCKS


def test_health_and_status_name_pools_and_workers(server, path):
    url = server.http_url
    r = httpx.get(url + "/health")
    assert (r.status_code, r.json()) == (200, {"status": "serving"})
    status = fetch_status(url, API_KEY)
    assert status == httpx.get(url + "/v1/status", headers=HEADERS).json()
    assert (status["model"], status["serving"]) == (path, True)
    roles = ["prefill", "decode"] if server.config.disaggregated else ["colocated"]
    assert sorted(p["role"] for p in status["pools"]) == sorted(roles)
    node = ray.get_runtime_context().get_node_id()
    workers = [w for p in status["pools"] for w in p["workers"]]
    assert sorted(w["name"] for w in workers) == sorted(w.name for w in server.router.workers)
    for w in workers:
        assert (w["node"], w["healthy"], w["kv_blocks_total"]) == (node, True, NUM_BLOCKS)
        assert w["pid"] != os.getpid()
        os.kill(w["pid"], 0)  # a live process of its own
        assert 0 <= w["kv_blocks_used"] <= NUM_BLOCKS
    assert all(w["name"] in format_status(status) for w in workers)
