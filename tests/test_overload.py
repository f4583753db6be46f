"""Overload of `pdserve serve` (the tiny model, disaggregated over gloo) at 10x its queue bound, over gRPC and
HTTP at once: what does not fit is refused at once (RESOURCE_EXHAUSTED / 429, p99 under 50 ms from send to
error), what was admitted completes with its greedy tokens, the router's memory stays bounded (this process
hosts it), and every block is back in its pool after."""
from __future__ import annotations

import asyncio
import gc
import time

import grpc
import httpx
import psutil
import pytest
from serving_support import GREEDY, MAX_TOKENS, pools_full, tiny_config

from pdserve.api import pdserve_pb2_grpc as pb_grpc
from pdserve.cluster.serve import ServerThread
from pdserve.router.client import build_request

MAX_CONCURRENT, MAX_QUEUED = 4, 8
FIRE = 10 * (MAX_CONCURRENT + MAX_QUEUED)  # per round, half over each API
ROUNDS = 5
GAP_S = 0.005  # between sends: 200 requests/s, all of a round sent within the first admitted ones' run
REFUSAL_P99_S = 0.050
RSS_GROWTH_BYTES = 200 << 20


@pytest.fixture(scope="module")
def server(path):
    limits = {"max_concurrent_requests": MAX_CONCURRENT, "max_queued_requests": MAX_QUEUED}
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo"}, limits=limits)) as server:
        yield server


async def _grpc(stub, prompt, delay_s: float) -> tuple[str, float, object]:
    """After `delay_s`: ('ok', seconds, token ids) or (status name, seconds from send to the error, details)."""
    await asyncio.sleep(delay_s)
    start, ids = time.monotonic(), []
    try:
        async for r in stub.Generate(build_request(token_ids=prompt, sampling={**GREEDY, "max_tokens": MAX_TOKENS})):
            ids += r.token_ids
    except grpc.aio.AioRpcError as e:
        return e.code().name, time.monotonic() - start, e.details()
    return "ok", time.monotonic() - start, ids


async def _http(client, url, prompt, delay_s: float) -> tuple[str, float, object]:
    await asyncio.sleep(delay_s)
    start = time.monotonic()
    r = await client.post(url + "/v1/completions", json={
        "prompt": prompt, "max_tokens": MAX_TOKENS, "logprobs": 0, "return_tokens_as_token_ids": True, **GREEDY})
    if r.status_code != 200:
        return str(r.status_code), time.monotonic() - start, r.json()["error"]
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    return "ok", time.monotonic() - start, [int(t.removeprefix("token_id:")) for t in tokens]


async def _rounds(server, prompt, rounds: int) -> tuple[list[tuple[str, float, object]], int]:
    """`rounds` rounds of FIRE requests, alternating APIs, each sent GAP_S after the one before (the first
    ones admitted are still running when the last is sent); the results, and the RSS growth over the rounds
    after the first (a warm-up: connections, first-call paths)."""
    async with grpc.aio.insecure_channel(server.grpc_address) as channel, \
            httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=FIRE)) as client:
        stub = pb_grpc.GenerationStub(channel)
        results, rss_before = [], None
        for k in range(rounds + 1):
            calls = [_grpc(stub, prompt, i * GAP_S) if i % 2 else _http(client, server.http_url, prompt, i * GAP_S)
                     for i in range(FIRE)]
            done = await asyncio.gather(*calls)
            if k == 0:
                rss_before = _rss()
            else:
                results += done
        return results, _rss() - rss_before


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_10x_the_queue_bound_is_refused_at_once_and_memory_stays_bounded(server, prompts, expected):
    results, growth = asyncio.run(_rounds(server, prompts[0], ROUNDS))
    done = [r for r in results if r[0] == "ok"]
    refused = [r for r in results if r[0] != "ok"]
    assert len(done) >= ROUNDS * (MAX_CONCURRENT + MAX_QUEUED)
    assert all(ids == expected[0] for _, _, ids in done)
    assert {r[0] for r in refused} == {"RESOURCE_EXHAUSTED", "429"}
    assert all("max_queued_requests" in (d if s != "429" else d["message"]) for s, _, d in refused)
    assert all(d["type"] == "rate_limit_error" for s, _, d in refused if s == "429")
    latencies = sorted(t for _, t, _ in refused)
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"refusals {len(refused)}/{len(results)}: p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms; RSS growth {growth / 2**20:.1f} MiB")
    assert p99 < REFUSAL_P99_S
    assert growth < RSS_GROWTH_BYTES
    assert pools_full(server) == []


def test_answers_on_a_kept_alive_connection_are_not_held_back(server):
    # With Nagle's algorithm on, each answer's body waited 40 ms for the client's delayed ACK of its head.
    with httpx.Client(timeout=10) as client:
        times = []
        for _ in range(21):
            start = time.monotonic()
            assert client.get(server.http_url + "/v1/models").status_code == 200
            times.append(time.monotonic() - start)
    assert sorted(times)[10] < 0.020
