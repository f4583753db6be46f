"""Faults under load: kill workers while 32 greedy streams run; no request is lost, no block leaks, the pool
replaces the dead worker. Loopback only; every wait bounded."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import ray
from serving_support import GREEDY, Background, pools_full, tiny_config

from pdserve.cluster.serve import ServerThread

NUM_STREAMS = 32
# A transfer to a dead worker fails within seconds (the connect to it too), so its blocks come back soon.
FAST_FAILING = {"transport": "gloo", "timeout_s": 5.0, "connect_timeout_s": 5.0}
LONG = 40  # tokens per stream: long enough that a kill lands mid-stream


@pytest.fixture(scope="module")
def reference(path, prompts):
    from conftest import hf_greedy

    return hf_greedy(path, prompts, LONG, ignore_eos=True)


def _config(path, **overrides):
    return tiny_config(path, kv_transfer=FAST_FAILING, rank_timeout_s=20.0,
                       prefill={"count": 2, "tp_size": 1}, decode={"count": 2, "tp_size": 1}, **overrides)


def _kill_worker(pid: int) -> None:
    """kill -9 a worker's process, after checking that it is one (a Ray actor's, not this test's)."""
    proc = psutil.Process(pid)
    assert pid not in (os.getpid(), os.getppid()) and proc.name().startswith("ray::"), (pid, proc.name())
    proc.send_signal(signal.SIGKILL)


def _load(server, prompts):
    return [Background(server.grpc_address, token_ids=prompts[i % len(prompts)], request_id=f"s{i}",
                       sampling={**GREEDY, "max_tokens": LONG}) for i in range(NUM_STREAMS)]


def _wait_streaming(runs, min_tokens: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(len(r.ids) >= min_tokens for r in runs) < len(runs) // 2:
        assert time.monotonic() < deadline, "the load did not get going"
        time.sleep(0.01)


def _replaced(server, role: str, dead_name: str, timeout_s: float) -> float:
    """Seconds until a new worker of `role` is serving in place of `dead_name`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        workers = [w for w in server.router.workers if w.role == role]
        if all(w.healthy for w in workers) and dead_name not in {w.name for w in workers} and len(workers) == 2:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{role} worker {dead_name} not replaced within {timeout_s}s")


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_killing_a_worker_loses_no_request(path, prompts, reference, role):
    with ServerThread(_config(path)) as server:
        runs = _load(server, prompts)
        _wait_streaming(runs, 1 if role == "prefill" else 5)
        victim = next(w for w in server.router.workers if w.role == role and w.healthy)
        _kill_worker(victim.info.pid)
        killed_at = time.monotonic()
        for r in runs:
            r.join(120)
        assert [r.error for r in runs] == [None] * NUM_STREAMS
        assert [r.ids for r in runs] == [reference[i % len(prompts)] for i in range(NUM_STREAMS)]
        assert _replaced(server, role, victim.name, 30 - (time.monotonic() - killed_at)) >= 0
        assert pools_full(server, 40) == []
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(victim.actor.ping.remote(), timeout=10)
        # the replacement serves
        fresh = Background(server.grpc_address, token_ids=prompts[1], sampling={**GREEDY, "max_tokens": LONG})
        assert fresh.join().ids == reference[1]
        assert server.router.status()["replacements"] == 1


def test_single_decode_worker_killed_ends_requests_within_5s(path, prompts):
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo"}, migration_limit=3)) as server:
        runs = _load(server, prompts)
        _wait_streaming(runs, 5)
        [decode] = [w for w in server.router.workers if w.role == "decode"]
        _kill_worker(decode.info.pid)
        start = time.monotonic()
        for r in runs:
            r.join(10)
        assert time.monotonic() - start < 5
        unfinished = [r for r in runs if r.finish is None]
        assert unfinished and all(r.error.status.name == "UNAVAILABLE" for r in unfinished)
        assert all(r.error is None for r in runs if r.finish == "length")


def test_killing_one_tp_rank_takes_its_gang_out_and_loses_no_request(path, prompts, reference):
    """Decode workers are TP gangs of 2: rank 1 of one is killed mid-stream; its gang leaves routing, its
    requests are migrated to the other gang, and the pool starts a new gang."""
    config = tiny_config(path, kv_transfer=FAST_FAILING, rank_timeout_s=20.0,
                         prefill={"count": 1, "tp_size": 1}, decode={"count": 2, "tp_size": 2})
    with ServerThread(config) as server:
        runs = _load(server, prompts)
        _wait_streaming(runs, 5)
        victim = next(w for w in server.router.workers if w.role == "decode")
        [peer] = server.deployment.gangs[victim.name].peers
        ray.kill(peer)
        killed_at = time.monotonic()
        for r in runs:
            r.join(120)
        assert [r.error for r in runs] == [None] * NUM_STREAMS
        assert [r.ids for r in runs] == [reference[i % len(prompts)] for i in range(NUM_STREAMS)]
        assert _replaced(server, "decode", victim.name, 60 - (time.monotonic() - killed_at)) >= 0
        assert pools_full(server, 40) == []


def test_a_full_kv_pool_makes_admission_wait_not_fail(path, prompts, reference):
    """Pools of 16 blocks (two or three sequences' worth): 32 streams wait for leases instead of
    overcommitting, and all complete with their undisturbed tokens."""
    with ServerThread(tiny_config(path, kv_transfer={"transport": "gloo"}, num_kv_blocks=16)) as server:
        runs = _load(server, prompts)
        for r in runs:
            r.join(180)
        assert [r.error for r in runs] == [None] * NUM_STREAMS
        assert [r.ids for r in runs] == [reference[i % len(prompts)] for i in range(NUM_STREAMS)]
        assert pools_full(server, 40) == []
