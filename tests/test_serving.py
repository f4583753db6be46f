"""`pdserve serve` end to end on a local Ray cluster: real prefill and decode actors, KV over gloo and gRPC,
the router's gRPC API on loopback, greedy tokens against transformers."""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from serving_support import GREEDY, Background, collect, pools_full, tiny_config, tiny_model, wait_for_state

from conftest import hf_greedy
from pdserve.cluster.serve import ServerThread
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.client import RemoteError, generate_text

TEXTS = ["Hello there, how", "The quick brown fox jumps over the lazy dog and keeps on running far",
         "a", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tiny_model(tmp_path_factory.mktemp("serving") / "tiny")
    tok = load_tokenizer(path)
    prompts = [tok.encode_prompt(t) for t in TEXTS]
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS)


def _ignore_eos_reference(path, prompts):
    """transformers' greedy tokens with EOS ignored (its `generate` would stop at the tiny model's EOS id)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=0, eos_token_id=None, min_new_tokens=MAX_TOKENS)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def expected(model):
    path, prompts, _ = model
    return _ignore_eos_reference(path, prompts)


@pytest.fixture(scope="module")
def gloo_server(model):
    with ServerThread(tiny_config(model[0], transport="gloo", router={"host": "127.0.0.1", "grpc_port": 0,
                                                                        "http_port": 0, "api_key": None},
                                  limits={"max_concurrent_requests": 40, "max_queued_requests": 8,
                                          "max_prompt_tokens": 200})) as server:
        yield server


def _greedy_texts(url, prompts):
    return [collect(url, token_ids=p, sampling={**GREEDY, "max_tokens": MAX_TOKENS})[0] for p in prompts]


def test_disaggregated_gloo_equals_transformers(gloo_server, model, expected):
    assert _greedy_texts(gloo_server.grpc_address, model[1]) == expected
    assert pools_full(gloo_server) == []


def test_text_prompt_and_usage(gloo_server, model, expected):
    ids, finish, usage = collect(gloo_server.grpc_address, text=TEXTS[1], sampling={**GREEDY, "max_tokens": 12})
    assert ids == expected[1] and finish == "length"
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(model[1][1]), 12)
    tok = load_tokenizer(model[0])
    out = generate_text(gloo_server.grpc_address, text=TEXTS[1], sampling={**GREEDY, "max_tokens": 12})
    assert out.text == tok.decode(expected[1])


def test_32_concurrent_streams_complete_and_pools_refill(gloo_server, model, expected):
    prompts = [model[1][i % len(model[1])] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda p: collect(gloo_server.grpc_address, token_ids=p,
                                                  sampling={**GREEDY, "max_tokens": MAX_TOKENS}), prompts))
    assert [r[0] for r in results] == [expected[i % len(expected)] for i in range(32)]
    assert all(r[1] == "length" for r in results)
    assert pools_full(gloo_server) == []


@pytest.mark.parametrize("stage", ["prefilling", "transferring", "decoding"])
def test_cancel_frees_blocks_on_both_sides(gloo_server, model, expected, stage):
    url = gloo_server.grpc_address
    long_prompt = model[1][1] * 2  # ~140 tokens: several chunks of 32
    others = [Background(url, token_ids=p, sampling={**GREEDY, "max_tokens": MAX_TOKENS}) for p in model[1]]
    victim = Background(url, token_ids=long_prompt, request_id=f"victim-{stage}",
                        sampling={**GREEDY, "max_tokens": 200})
    seen = wait_for_state(gloo_server, f"victim-{stage}", {stage, "decoding"} if stage != "decoding" else {stage})
    assert seen is not None
    victim.cancel()
    victim.join()
    assert victim.error is not None and victim.error.status.name == "CANCELLED"
    assert [b.join().ids for b in others] == expected
    assert pools_full(gloo_server) == []


def test_deadline_ends_the_request_and_frees_blocks(gloo_server, model):
    with pytest.raises(RemoteError) as e:
        collect(gloo_server.grpc_address, token_ids=model[1][1] * 2, sampling={**GREEDY, "max_tokens": 400},
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
def test_bad_input_is_invalid_argument_and_others_continue(gloo_server, model, expected, kwargs, field):
    other = Background(gloo_server.grpc_address, token_ids=model[1][1], sampling={**GREEDY, "max_tokens": MAX_TOKENS})
    with pytest.raises(RemoteError) as e:
        collect(gloo_server.grpc_address, **kwargs)
    assert e.value.status.name == "INVALID_ARGUMENT"
    assert field in e.value.details
    assert other.join().ids == expected[1]


def test_full_queue_is_refused_at_once(gloo_server, model):
    # 40 may run and 8 may queue: 60 long requests at once leave 12 refused, each at once
    url = gloo_server.grpc_address
    runs = [Background(url, token_ids=model[1][0], sampling={**GREEDY, "max_tokens": 60}) for _ in range(60)]
    for r in runs:
        r.join(120)
    refused = [r for r in runs if r.error is not None]
    assert refused and all(r.error.status.name == "RESOURCE_EXHAUSTED" for r in refused)
    assert "max_queued_requests" in refused[0].error.details
    assert all(r.finish == "length" for r in runs if r.error is None)
    assert pools_full(gloo_server) == []


def test_stop_string_ends_the_stream(gloo_server, model, expected):
    tok = load_tokenizer(model[0])
    full = tok.decode(expected[1])
    stop = full[3:5]
    out = generate_text(gloo_server.grpc_address, token_ids=model[1][1],
                        sampling={**GREEDY, "max_tokens": MAX_TOKENS, "stop": [stop]})
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert pools_full(gloo_server) == []


@pytest.mark.parametrize("overrides", [
    {"transport": "grpc"},
    {"disaggregated": False},
    {"api_key": "secret"},
], ids=["grpc-transport", "colocated", "api-key"])
def test_other_deployments_equal_transformers(model, expected, overrides):
    api_key = overrides.pop("api_key", None)
    router = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "api_key": api_key}
    with ServerThread(tiny_config(model[0], router=router, **overrides)) as server:
        url = server.grpc_address
        if api_key is not None:
            for key in (None, "wrong"):
                with pytest.raises(RemoteError) as e:
                    collect(url, text="hi", api_key=key)
                assert e.value.status.name == "UNAUTHENTICATED"
        got = [collect(url, token_ids=p, api_key=api_key, sampling={**GREEDY, "max_tokens": MAX_TOKENS})[0]
               for p in model[1]]
        assert got == expected
        assert pools_full(server) == []


def test_lease_expires_when_prefill_never_sends(model):
    """The prefill worker is stopped (SIGSTOP) before it can send: the decode lease expires, the request ends
    UNAVAILABLE within transfer_timeout_s + 2 s, and the decode worker's blocks come back."""
    timeout = 3.0
    with ServerThread(tiny_config(model[0], transport="gloo", transfer_timeout_s=timeout)) as server:
        [prefill] = [w for w in server.router.workers if w.role == "prefill"]
        os.kill(prefill.info.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            victim = Background(server.grpc_address, token_ids=model[1][1], sampling={**GREEDY, "max_tokens": 5})
            victim.join(timeout + 10)
            assert victim.error is not None and victim.error.status.name == "UNAVAILABLE", victim.error
            assert "KV transfer failed" in victim.error.details
            assert time.monotonic() - start <= timeout + 2
            decode = [w for w in server.router.workers if w.role == "decode"]
            load = ray.get(decode[0].actor.load_now.remote())
            assert load.free_blocks == load.total_blocks
        finally:
            os.kill(prefill.info.pid, signal.SIGCONT)
        assert pools_full(server) == []
