"""Greedy token ids equal transformers' greedy `generate`, and the block pool is full afterwards."""
from __future__ import annotations

import random

import pytest

from conftest import VARIANTS, assert_pool_full, hf_greedy, make_engine
from pdserve.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def random_prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    prompts = random_prompts(3, [5, 17, 30])
    engine = make_engine(path)
    assert engine.generate(prompts, GREEDY) == hf_greedy(path, prompts, GREEDY.max_tokens)
    assert_pool_full(engine)


def test_arrivals_mid_generation(tiny_checkpoints):
    """Requests of different lengths join while others are mid-generation."""
    path = tiny_checkpoints["llama-gqa-untied"]
    prompts = random_prompts(5, [3, 21, 9, 40, 14], seed=1)
    engine = make_engine(path)
    out: dict[str, list[int]] = {}
    ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    pending = list(prompts[2:])
    steps = 0
    while engine.has_unfinished() or pending:
        if pending and steps % 3 == 2:
            ids.append(engine.add_request(pending.pop(0), GREEDY))
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
    assert [out[i] for i in ids] == hf_greedy(path, prompts, GREEDY.max_tokens)
    assert_pool_full(engine)


def test_chunked_prefill(tiny_checkpoints):
    path = tiny_checkpoints["qwen3-qk-norm"]
    prompts = random_prompts(3, [37, 23, 11], seed=2)
    engine = make_engine(path, max_num_batched_tokens=8, max_num_seqs=4, block_size=4)
    assert engine.generate(prompts, GREEDY) == hf_greedy(path, prompts, GREEDY.max_tokens)
    assert_pool_full(engine)


def test_preemption_recomputes_exactly(tiny_checkpoints):
    path = tiny_checkpoints["llama-mha-tied"]
    prompts = random_prompts(4, [10, 13, 7, 12], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    # 12 blocks of 4 slots: each request alone fits, all four together cannot.
    engine = make_engine(path, num_kv_blocks=12, block_size=4, max_model_len=48)
    assert engine.generate(prompts, params) == hf_greedy(path, prompts, params.max_tokens)
    assert engine.scheduler.num_preemptions > 0
    assert_pool_full(engine)


def test_embedded_model_matches_transformers(embedded_dir):
    from pdserve.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_dir)
    prompts = [
        tok.encode_prompt("What is the capital of France?", chat=True),
        tok.encode_prompt("Write a haiku about the sea.", chat=True),
        tok.encode_prompt("The three primary colors are"),
    ]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    engine = make_engine("SmolLM2-135M-Instruct")
    out = engine.generate(prompts, params)
    assert out == hf_greedy(embedded_dir, prompts, params.max_tokens)
    assert "Paris" in tok.decode(out[0])
    assert_pool_full(engine)
