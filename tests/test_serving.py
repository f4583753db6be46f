"""`pdserve serve` end to end on a local Ray cluster: real prefill and decode actors, KV over gloo and gRPC,
the router's gRPC API on loopback, greedy tokens against transformers."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_support import (
    GREEDY,
    MAX_TOKENS,
    TEXTS,
    Background,
    collect,
    pools_full,
    tiny_config,
    wait_for_state,
)

from pdserve.cluster.serve import ServerThread
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.client import RemoteError, generate_text


@pytest.fixture(scope="module")
def gloo_server(path):
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo"},
                                  router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "api_key": None},
                                  limits={"max_concurrent_requests": 40, "max_queued_requests": 8,
                                          "max_prompt_tokens": 200})) as server:
        yield server


def _greedy_texts(url, prompts):
    return [collect(url, token_ids=p, sampling={**GREEDY, "max_tokens": MAX_TOKENS})[0] for p in prompts]


def test_disaggregated_gloo_equals_transformers(gloo_server, path, prompts, expected):
    assert _greedy_texts(gloo_server.grpc_address, prompts) == expected
    assert pools_full(gloo_server) == []


def test_text_prompt_and_usage(gloo_server, path, prompts, expected):
    ids, finish, usage = collect(gloo_server.grpc_address, text=TEXTS[1], sampling={**GREEDY, "max_tokens": 12})
    assert ids == expected[1] and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompts[1]), 12)
    tok = load_tokenizer(path)
    out = generate_text(gloo_server.grpc_address, text=TEXTS[1], sampling={**GREEDY, "max_tokens": 12})
    assert out.text == tok.decode(expected[1])


def test_32_concurrent_streams_complete_and_pools_refill(gloo_server, path, prompts, expected):
    prompts = [prompts[i % len(prompts)] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: collect(gloo_server.grpc_address, token_ids=p,
                                                  sampling={**GREEDY, "max_tokens": MAX_TOKENS}), prompts))
    assert [r[0] for r in results] == [expected[i % len(expected)] for i in range(32)]
    assert all(r[1] == "length" for r in results)
    assert pools_full(gloo_server) == []


@pytest.mark.parametrize("stage", ["prefilling", "transferring", "decoding"])
def test_cancel_frees_blocks_on_both_sides(gloo_server, path, prompts, expected, stage):
    url = gloo_server.grpc_address
    long_prompt = prompts[1] * 2  # ~140 tokens: several chunks of 32
    others = [Background(url, token_ids=p, sampling={**GREEDY, "max_tokens": MAX_TOKENS}) for p in prompts]
    victim = Background(url, token_ids=long_prompt, request_id=f"victim-{stage}",
                        sampling={**GREEDY, "max_tokens": 200})
    seen = wait_for_state(gloo_server, f"victim-{stage}", {stage, "decoding"} if stage != "decoding" else {stage})
    assert seen is not None
    victim.cancel()
    victim.join()
    assert victim.error is not None and victim.error.status.name == "CANCELLED"
    assert [b.join().ids for b in others] == expected
    assert pools_full(gloo_server) == []


def test_deadline_ends_the_request_and_frees_blocks(gloo_server, prompts):
    with pytest.raises(RemoteError) as e:
        collect(gloo_server.grpc_address, token_ids=prompts[1] * 2, sampling={**GREEDY, "max_tokens": 400},
                timeout_s=0.5)
    assert e.value.status.name == "DEADLINE_EXCEEDED"
    assert pools_full(gloo_server) == []


@pytest.mark.parametrize("kwargs, field", [
    ({"text": ""}, "text"),
    ({"token_ids": [1] * 300}, "max_prompt_tokens"),
    ({"text": "hi", "sampling": {"temperature": -1.0}}, "temperature"),
    ({"text": "hi", "sampling": {"top_p": 1.5}}, "top_p"),
    ({"text": "hi", "sampling": {"max_tokens": 100000}}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"token_ids": [1, 999]}, "vocabulary"),
])
def test_bad_input_is_invalid_argument_and_others_continue(gloo_server, path, prompts, expected, kwargs, field):
    other = Background(gloo_server.grpc_address, token_ids=prompts[1], sampling={**GREEDY, "max_tokens": MAX_TOKENS})
    with pytest.raises(RemoteError) as e:
        collect(gloo_server.grpc_address, **kwargs)
    assert e.value.status.name == "INVALID_ARGUMENT"
    assert field in e.value.details
    assert other.join().ids == expected[1]


def test_full_queue_is_refused_at_once(gloo_server, prompts):
    # 40 may run and 8 may queue: 60 long requests at once leave 12 refused, each at once
    url = gloo_server.grpc_address
    runs = [Background(url, token_ids=prompts[0], sampling={**GREEDY, "max_tokens": 60}) for _ in range(60)]
    for r in runs:
        r.join(120)
    refused = [r for r in runs if r.error is not None]
    assert refused and all(r.error.status.name == "RESOURCE_EXHAUSTED" for r in refused)
    assert "max_queued_requests" in refused[0].error.details
    assert all(r.finish == "length" for r in runs if r.error is None)
    assert pools_full(gloo_server) == []


def test_stop_string_ends_the_stream(gloo_server, path, prompts, expected):
    tok = load_tokenizer(path)
    full = tok.decode(expected[1])
    stop = full[3:5]
    out = generate_text(gloo_server.grpc_address, token_ids=prompts[1],
                        sampling={**GREEDY, "max_tokens": MAX_TOKENS, "stop": [stop]})
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert pools_full(gloo_server) == []
