"""Engine-level sampling, validation, abort: what a caller of `LLMEngine` relies on."""
from __future__ import annotations

import pytest

from conftest import assert_pool_full, make_engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import ConfigError, InvalidRequestError, UnsupportedModelError

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17], [40, 41]]


@pytest.fixture(scope="module")
def engine(tiny_checkpoints):
    return make_engine(tiny_checkpoints["llama-gqa-untied"])


def test_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    first = engine.generate(PROMPTS, params)
    second = engine.generate(PROMPTS[::-1], params)[::-1]  # other batch positions
    assert first == second
    assert engine.generate(PROMPTS, SamplingParams(temperature=1.0, seed=99, max_tokens=10)) != first
    assert_pool_full(engine)


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=10))
    assert engine.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=10)) == greedy


def test_mixed_parameters_in_one_batch(engine):
    params = [SamplingParams(temperature=0.0, max_tokens=6),
              SamplingParams(temperature=0.7, top_k=5, seed=1, max_tokens=3, logprobs=2),
              SamplingParams(temperature=1.2, min_p=0.1, repetition_penalty=1.3, seed=2, max_tokens=8)]
    out = engine.generate(PROMPTS, params)
    assert [len(o) for o in out] == [6, 3, 8]
    assert out[0] == engine.generate(PROMPTS[:1], params[0])[0]
    assert_pool_full(engine)


def test_logprobs_are_reported(engine):
    rid = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))
    [o] = engine.step()
    assert o.request_id == rid and o.finished and o.finish_reason == "length"
    [lp] = o.logprobs
    assert len(lp["top"]) == 3 and o.new_token_ids[0] in lp["top"]
    assert lp["token_logprob"] == pytest.approx(max(lp["top"].values()))


@pytest.mark.parametrize("prompt, message", [
    ([], "prompt is empty"),
    (list(range(3, 600)), "prompt has 597 tokens; max_model_len is 512"),
    ([5, 300], "prompt token id 300 is outside the vocabulary [0, 256)"),
])
def test_invalid_prompts_are_rejected_before_work(engine, prompt, message):
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request(prompt, SamplingParams())
    assert message in err.value.message
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request([5, 6], SamplingParams(max_tokens=1), request_id="dup")
    with pytest.raises(InvalidRequestError, match="'dup' is already in use"):
        engine.add_request([5, 6], SamplingParams(max_tokens=1), request_id="dup")
    engine.abort("dup")
    assert not engine.has_unfinished()
    assert_pool_full(engine)


def test_abort_mid_generation_frees_blocks(engine):
    rid = engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=50))
    engine.step()
    engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    engine.abort(rid)
    assert not engine.has_unfinished()
    assert_pool_full(engine)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(UnsupportedModelError, match="architecture 'GPT2LMHeadModel' is not supported"):
        make_engine(str(tmp_path))


def test_unknown_model_is_named():
    with pytest.raises(ConfigError, match="'no/such/model' is neither a folder"):
        make_engine("no/such/model")


def test_dummy_weights_run_at_the_configured_shape(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["qwen3-qk-norm"], load_format="dummy")
    [out] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4))
    assert len(out) == 4 and all(0 <= t < 256 for t in out)
