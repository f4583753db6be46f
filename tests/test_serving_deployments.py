"""`pdserve serve` end to end, one deployment per test: KV over gRPC, colocated, an API key, a lease whose KV
never comes. (Separate from test_serving.py so its shared server is gone before these start.)"""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from serving_support import GREEDY, MAX_TOKENS, Background, collect, pools_full, tiny_config

from pdserve.cluster.serve import ServerThread
from pdserve.router.client import RemoteError


@pytest.mark.parametrize("overrides", [
    {"kv_transfer": {"transport": "grpc"}},
    {"disaggregated": False},
    {"api_key": "secret"},
    {"kv_transfer": {"transport": "gloo"},
     "prefill": {"count": 1, "tp_size": 1}, "decode": {"count": 1, "tp_size": 2}},
    {"kv_transfer": {"transport": "grpc"},
     "prefill": {"count": 1, "tp_size": 2}, "decode": {"count": 1, "tp_size": 1}},
], ids=["grpc-transport", "colocated", "api-key", "prefill-tp1-decode-tp2", "prefill-tp2-decode-tp1"])
def test_other_deployments_equal_transformers(path, prompts, expected, overrides):
    api_key = overrides.pop("api_key", None)
    router = {"host": "127.0.0.1", "grpc_port": 0, "http_port": 0, "api_key": api_key}
    with ServerThread(tiny_config(path, router=router, **overrides)) as server:
        url = server.grpc_address
        if api_key is not None:
            for key in (None, "wrong"):
                with pytest.raises(RemoteError) as e:
                    collect(url, text="hi", api_key=key)
                assert e.value.status.name == "UNAUTHENTICATED"
        got = [collect(url, token_ids=p, api_key=api_key, sampling={**GREEDY, "max_tokens": MAX_TOKENS})[0]
               for p in prompts]
        assert got == expected
        assert pools_full(server) == []


def test_lease_expires_when_prefill_never_sends(path, prompts):
    """The prefill worker is stopped (SIGSTOP) before it can send: the decode lease expires, the request ends
    UNAVAILABLE within kv_transfer.timeout_s + 2 s, and the decode worker's blocks come back."""
    timeout = 3.0
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo", "timeout_s": timeout})) as server:
        [prefill] = [w for w in server.router.workers if w.role == "prefill"]
        os.kill(prefill.info.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            victim = Background(server.grpc_address, token_ids=prompts[1], sampling={**GREEDY, "max_tokens": 5})
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
