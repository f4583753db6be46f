"""Sampling parameters and the batched sampler: validation, greedy, filters, penalties, seeds, logprobs."""
import math

import pytest
import torch

from pdserve.engine.sampler import Sampler, SamplingBatch, apply_penalties
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError

VOCAB = 32
# A crafted distribution: which tokens each filter keeps is known by hand.
PROBS = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])


def make_logits(batch_size: int, vocab_size: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, vocab_size, generator=torch.Generator().manual_seed(seed))


def make_generators(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in params]


def make_batch(params, prompts=None, outputs=None, generators=None, vocab_size=VOCAB) -> SamplingBatch:
    empty = [[] for _ in params]
    return SamplingBatch.build(
        params, prompts or empty, outputs or empty, generators or make_generators(params), vocab_size, "cpu"
    )


def sample(logits, params, **kwargs):
    return Sampler()(logits, make_batch(params, vocab_size=logits.shape[-1], **kwargs))


# --- SamplingParams ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_tokens", 0, "max_tokens must be >= 1, got 0"),
        ("max_tokens", 1.5, "max_tokens must be an integer, got 1.5"),
        ("max_tokens", True, "max_tokens must be an integer, got True"),
        ("temperature", -1.0, "temperature must be >= 0, got -1.0"),
        ("temperature", float("nan"), "temperature must be a finite number, got nan"),
        ("temperature", "hot", "temperature must be a number, got 'hot'"),
        ("temperature", False, "temperature must be a number, got False"),
        ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -1, "top_k must be >= 0, got -1"),
        ("top_k", 2.0, "top_k must be an integer, got 2.0"),
        ("min_p", 1.5, "min_p must be in [0, 1], got 1.5"),
        ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
        ("seed", 2**63, f"seed must be <= {2**63 - 1}, got {2**63}"),
        ("seed", "42", "seed must be an integer, got '42'"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0, got 0.0"),
        ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number, got inf"),
        ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2], got 2.5"),
        ("frequency_penalty", -3, "frequency_penalty must be in [-2, 2], got -3.0"),
        ("stop_token_ids", 5, "stop_token_ids must be a list of integers, got 5"),
        ("stop_token_ids", (1, -5), "stop_token_ids[1] must be >= 0, got -5"),
        ("stop_token_ids", [1, "a"], "stop_token_ids[1] must be an integer, got 'a'"),
        ("ignore_eos", 1, "ignore_eos must be a bool, got 1"),
        ("logprobs", 21, "logprobs must be <= 20, got 21"),
        ("logprobs", -1, "logprobs must be >= 0, got -1"),
    ],
)
def test_invalid_params_name_field_and_value(field, value, message):
    with pytest.raises(InvalidRequestError) as exc:
        SamplingParams(**{field: value})
    assert str(exc.value) == message


def test_params_defaults_and_normalization():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 1.0, 1.0, None, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.stop_token_ids, p.ignore_eos, p.logprobs) == (None, (), False, None)
    q = SamplingParams(temperature=1, stop_token_ids=[2, 3])
    assert q == SamplingParams(temperature=1.0, stop_token_ids=(2, 3))
    assert isinstance(q.temperature, float) and hash(q) == hash(SamplingParams(stop_token_ids=(2, 3)))
    assert SamplingParams(top_k=0, logprobs=0, seed=-1).top_k == 0


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(top_k=0).is_greedy
    assert not SamplingParams(temperature=0.01).is_greedy


# --- SamplingBatch.build ----------------------------------------------------------------------------------

def test_build_skips_unneeded_work():
    batch = make_batch([SamplingParams(temperature=0, seed=3, top_p=0.5), SamplingParams(top_k=1, min_p=0.2)])
    assert batch.all_greedy and batch.greedy.tolist() == [True, True]
    assert (batch.temperature, batch.top_k, batch.top_p, batch.min_p) == (None, None, None, None)
    assert batch.generators == {} and batch.num_logprobs is None
    assert batch.seen_mask is None and batch.output_counts is None

    batch = make_batch([SamplingParams(top_k=4), SamplingParams(top_k=VOCAB + 5), SamplingParams()])
    assert batch.greedy is None and not batch.all_greedy
    assert batch.top_k.tolist() == [4, VOCAB, VOCAB] and batch.max_top_k == 4
    assert (batch.temperature, batch.top_p, batch.min_p, batch.repetition_penalty) == (None,) * 4


def test_build_pads_histories_into_counts():
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(frequency_penalty=0.5)]
    batch = make_batch(params, prompts=[[1, 2, 2], []], outputs=[[5], [7, 7, 7, 3]], vocab_size=8)
    assert batch.output_counts.tolist() == [[0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0, 3]]
    assert batch.seen_mask.tolist() == [[False, True, True, False, False, True, False, False],
                                        [False, False, False, True, False, False, False, True]]


# --- Sampler ----------------------------------------------------------------------------------------------

def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = make_logits(8)
    logits[0] = torch.tensor([1.0, 3.0, 3.0] + [0.0] * (VOCAB - 3))
    out = sample(logits, [SamplingParams(temperature=0)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1)) and out.token_ids[0] == 1
    assert out.token_ids.dtype == torch.int64 and out.logprobs is None
    half = logits.bfloat16()
    assert torch.equal(sample(half, [SamplingParams(temperature=0)] * 8).token_ids, half.float().argmax(-1))


def test_top_k_one_equals_greedy():
    logits = make_logits(16, seed=1)
    kwargs = {"prompts": [[3, 4]] * 16, "outputs": [[5]] * 16}
    penalties = {"repetition_penalty": 1.3, "frequency_penalty": 0.4}
    for _ in range(3):
        top1 = sample(logits, [SamplingParams(temperature=0.7, top_k=1, **penalties)] * 16, **kwargs)
        greedy = sample(logits, [SamplingParams(temperature=0, **penalties)] * 16, **kwargs)
        assert torch.equal(top1.token_ids, greedy.token_ids)


def test_seeded_requests_reproduce_alone_and_in_any_batch_position():
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    target_logits = make_logits(1, seed=2)

    def run(params, row):
        logits = make_logits(len(params), seed=3)
        logits[row] = target_logits[0]
        generators, tokens = make_generators(params), []
        for _ in range(20):
            tokens.append(sample(logits, params, generators=generators).token_ids[row].item())
        return tokens

    alone = run([target], 0)
    others = [SamplingParams(), SamplingParams(seed=7, top_k=5), SamplingParams(temperature=0)]
    torch.manual_seed(99)  # the unseeded rows draw from the global RNG; it must not matter
    assert run(others[:2] + [target, others[2]], 2) == alone
    assert run([target] + others, 0) == alone
    assert run([SamplingParams(temperature=0.9, top_p=0.95, seed=4321)], 0) != alone


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_p=0.65), {0, 1}),  # mass from the bottom: .05 .15 .30 | .60
        (SamplingParams(min_p=0.3), {0, 1, 2}),  # threshold 0.12
        (SamplingParams(top_k=3, top_p=0.8), {0, 1}),  # top-k first: .47 .35 | .18 renormalized
        (SamplingParams(temperature=0.5, min_p=0.1), {0, 1, 2}),  # p^2 renormalized: .56 .32 .08 | .04
        (SamplingParams(), {0, 1, 2, 3, 4}),
    ],
)
def test_filters_never_pick_a_masked_token(params, allowed):
    torch.manual_seed(0)
    logits = PROBS.log().expand(4000, -1)
    tokens = sample(logits, [params] * 4000).token_ids
    assert set(tokens.tolist()) == allowed


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_frequencies_follow_the_distribution(temperature):
    torch.manual_seed(0)
    n = 20000
    tokens = sample(PROBS.log().expand(n, -1), [SamplingParams(temperature=temperature)] * n).token_ids
    expected = (PROBS.log() / temperature).softmax(dim=-1)
    assert torch.allclose(tokens.bincount(minlength=5) / n, expected, atol=0.015)


def test_penalties_change_exactly_the_expected_logits():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 0.0]).expand(4, -1)
    params = [
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
    ]
    # Tokens 0, 1 in the prompt; 1 once and 3 twice in the output.
    batch = make_batch(params, prompts=[[0, 1]] * 4, outputs=[[1, 3, 3]] * 4, vocab_size=6)
    assert apply_penalties(logits, batch).tolist() == [
        [1.0, -2.0, 0.5, 1.5, -2.0, 0.0],  # seen: positive / 2, negative * 2
        [2.0, -1.75, 0.5, 2.0, -2.0, 0.0],  # output only: -0.5 presence, -0.25 per occurrence
        [1.0, -2.75, 0.5, 0.5, -2.0, 0.0],  # repetition first, then presence/frequency
        [2.0, -1.0, 0.5, 3.0, -2.0, 0.0],
    ]
    # The greedy pick follows the penalized logits.
    out = sample(logits[:1], [SamplingParams(temperature=0, frequency_penalty=2.0)], outputs=[[3]])
    assert out.token_ids.tolist() == [0]


def test_mixed_batch_applies_each_rows_own_parameters():
    torch.manual_seed(0)
    logits = make_logits(6, seed=3)
    prompt = logits[1].topk(2).indices.tolist()  # penalizing these moves row 1's argmax
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=1, repetition_penalty=1.8),
        seeded,
        SamplingParams(top_k=3),
        SamplingParams(temperature=1.3, min_p=0.5),
        SamplingParams(temperature=0, presence_penalty=2.0),
    ]
    outputs = [[], [], [], [], [], [logits[5].argmax().item()]]
    for _ in range(10):
        out = sample(logits, params, prompts=[[], prompt, [], [], [], []], outputs=outputs)
        row1 = logits[1].clone()
        row1[prompt] = torch.where(row1[prompt] > 0, row1[prompt] / 1.8, row1[prompt] * 1.8)
        row5 = logits[5].clone()
        row5[outputs[5]] -= 2.0
        assert out.token_ids[0] == logits[0].argmax()
        assert out.token_ids[1] == row1.argmax() != logits[1].argmax()
        assert out.token_ids[5] == row5.argmax() != logits[5].argmax()
        assert out.token_ids[3].item() in logits[3].topk(3).indices.tolist()
        probs4 = (logits[4] / 1.3).softmax(dim=-1)
        assert probs4[out.token_ids[4]] >= 0.5 * probs4.max()
    alone = sample(logits[2:3], [seeded]).token_ids[0]
    assert sample(logits, params, prompts=[[], prompt, [], [], [], []], outputs=outputs).token_ids[2] == alone


def test_logprobs_are_raw_log_softmax():
    logits = make_logits(4, seed=4)
    original = logits.clone()
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.5, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(top_p=0.5, logprobs=5),
    ]
    out = sample(logits, params, prompts=[[0, 1, 2]] * 4)
    assert torch.equal(logits, original)  # the caller's logits are never modified
    expected = logits.log_softmax(dim=-1)
    lp = out.logprobs
    assert lp.token_logprobs.shape == (4,) and lp.top_token_ids.shape == lp.top_logprobs.shape == (4, 5)
    assert torch.equal(lp.token_logprobs, expected.gather(1, out.token_ids[:, None]).squeeze(1))
    assert torch.equal(lp.top_token_ids, expected.topk(5).indices)
    assert torch.equal(lp.top_logprobs, expected.topk(5).values)
    assert math.isclose(lp.top_logprobs[0].exp().sum().item(), expected[0].topk(5).values.exp().sum().item())

    only_chosen = sample(logits, [SamplingParams(logprobs=0)] * 4).logprobs
    assert only_chosen.top_token_ids.shape == (4, 0) and only_chosen.token_logprobs.shape == (4,)
