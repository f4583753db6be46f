"""Tensor parallelism on a local Ray cluster over gloo: exact equality with TP=1, isolation, failure."""
from __future__ import annotations

import threading
import time

import pytest
import ray

from conftest import make_engine, make_tiny_checkpoint
from pdserve.cluster.tp_gang import TPGang
from pdserve.config import load_config
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError, WorkerFailedError

GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
PROMPTS = [[5, 9, 33, 7, 100, 3], [11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53]]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def gang(model: str, tp: int = 2, **overrides) -> TPGang:
    return TPGang(load_config(None, model=model, device="cpu", dtype="float32", **overrides), tp)


@pytest.mark.parametrize("kv_heads, heads", [(2, 4), (1, 4), (3, 6)], ids=["split", "replicated", "uneven"])
def test_tp2_equals_tp1(tmp_path, kv_heads, heads):
    path = make_tiny_checkpoint(tmp_path / "m", "llama-gqa-untied", num_key_value_heads=kv_heads,
                                num_attention_heads=heads, hidden_size=16 * heads)
    expected = make_engine(path).generate(PROMPTS, GREEDY)
    g = gang(path)
    try:
        assert g.generate(PROMPTS, GREEDY) == expected
        free, total = g.free_blocks()
        assert free == total
    except BaseException:
        g.shutdown()
        raise
    assert g.shutdown() is True  # rank 0 stopped every rank on request: nothing had to be killed


def test_tp2_async_scheduling_equals_tp1(tiny_checkpoints):
    """Rank 0 plans each step before reading the previous one's tokens; the other rank gets the sampled ids
    it needs by broadcast. Greedy, seeded and stopped requests come out as from a synchronous TP=1 engine."""
    path = tiny_checkpoints["llama-gqa-untied"]
    stop = make_engine(path).generate(PROMPTS[:1], GREEDY)[0][2]
    params = [SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop]),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=7), GREEDY]
    expected = make_engine(path, async_scheduling=False).generate(PROMPTS, params)
    g = gang(path, async_scheduling=True)
    try:
        assert g.generate(PROMPTS, params) == expected
        assert expected[0][-1] == stop and len(expected[0]) == 3
        free, total = g.free_blocks()
        assert free == total
    finally:
        g.shutdown()


def test_embedded_model_tp2_equals_tp1(embedded_dir):
    from pdserve.engine.tokenizer import load_tokenizer

    prompts = [load_tokenizer(embedded_dir).encode_prompt("What is the capital of France?", chat=True)]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    expected = make_engine("SmolLM2-135M-Instruct").generate(prompts, params)
    g = gang("SmolLM2-135M-Instruct")
    try:
        assert g.generate(prompts, params) == expected
    finally:
        g.shutdown()


def killed_rank_fails_in_time(g: TPGang, within_s: float) -> None:
    """Kill rank 1 of `g` (a request pending): stepping fails, naming the rank, within `within_s`, and the
    gang then refuses every call until it is restarted."""
    ray.kill(g.ranks[1])
    start = time.monotonic()
    with pytest.raises(WorkerFailedError, match="tp gang: rank 1 failed"):
        while True:
            g.step()
    assert time.monotonic() - start < within_s
    with pytest.raises(WorkerFailedError, match="broken by an earlier failure"):
        g.step()


def test_two_gangs_start_together_and_die_cleanly(tiny_checkpoints):
    path = tiny_checkpoints["qwen3-qk-norm"]
    expected = make_engine(path).generate(PROMPTS, GREEDY)
    gangs: list = [None, None]

    def start(i):
        gangs[i] = gang(path, rank_timeout_s=20)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    a, b = gangs
    try:
        assert a.generate(PROMPTS, GREEDY) == expected
        assert b.generate(PROMPTS, GREEDY) == expected
        # Errors from rank 0 come back as themselves; the gang stays usable.
        with pytest.raises(InvalidRequestError, match="prompt is empty"):
            a.add_request([], GREEDY)
        assert a.generate(PROMPTS[:1], GREEDY) == expected[:1]

        # Kill one rank of gang b with a request pending: the call fails within the timeout.
        b.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=200))
        killed_rank_fails_in_time(b, 20)
        assert a.generate(PROMPTS[:1], GREEDY) == expected[:1]  # the other gang is untouched
        b.restart()
        assert b.generate(PROMPTS, GREEDY) == expected
    finally:
        for g in gangs:
            if g is not None:
                g.shutdown()


def test_pools_take_tp_size_from_the_deployment(tiny_checkpoints):
    from pdserve.cluster.pools import Role, WorkerPool

    path = tiny_checkpoints["llama-gqa-untied"]
    config = load_config(None, model=path, device="cpu", dtype="float32",
                         prefill={"count": 1, "tp_size": 2}, decode={"count": 1, "tp_size": 1})
    expected = make_engine(path).generate(PROMPTS, GREEDY)
    pools = [WorkerPool(config, Role.PREFILL), WorkerPool(config, Role.DECODE)]
    try:
        assert [len(p.workers[0].ranks) for p in pools] == [2, 1]
        for p in pools:
            assert p.workers[0].generate(PROMPTS, GREEDY) == expected
    finally:
        for p in pools:
            p.shutdown()
