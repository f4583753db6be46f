"""Asynchronous scheduling: the next step is planned and enqueued before the tokens of the one in flight are
read. Everything a caller sees must be what the synchronous engine gives: the same tokens (and transformers'
greedy ones), finish reasons, logprobs, seeded draws, and a full block pool at the end."""
from __future__ import annotations

import pytest

from conftest import assert_pool_full, hf_greedy, make_engine
from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step import StepBatch

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17], [40, 41], [8, 100, 200, 3, 4, 5, 6, 7, 90]]


def run(engine, prompts, params, arrive_every: int = 0) -> dict[str, list]:
    """Drive `engine` to the end (prompts arriving one per `arrive_every` steps when > 0); every output
    field per request, in order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    waiting = list(zip(prompts, params))
    ids, seen = [], {}
    steps = 0
    while waiting or engine.has_unfinished():
        if waiting and (not arrive_every or steps % arrive_every == 0):
            ids.append(engine.add_request(*waiting.pop(0)))
        for o in engine.step():
            seen.setdefault(o.request_id, []).append((o.new_token_ids, o.finished, o.finish_reason, o.logprobs))
        steps += 1
    return [seen[i] for i in ids]


def both(path, prompts, params, arrive_every: int = 0, **overrides):
    """(synchronous, asynchronous) outputs of the same workload; the pool is full after each."""
    outs = []
    for overlap in (False, True):
        engine = make_engine(path, async_scheduling=overlap, **overrides)
        assert engine.async_scheduling is overlap
        outs.append(run(engine, prompts, params, arrive_every))
        assert not engine.has_unfinished()
        assert_pool_full(engine)
    return outs


def tokens(outputs) -> list[list[int]]:
    return [[t for ids, *_ in per_request for t in ids] for per_request in outputs]


def test_greedy_equals_transformers_and_sync(tiny_checkpoints):
    path = tiny_checkpoints["llama-gqa-untied"]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    sync, overlap = both(path, PROMPTS, params)
    assert overlap == sync
    assert tokens(overlap) == hf_greedy(path, PROMPTS, params.max_tokens)


def test_arrivals_chunked_prefill_and_preemption(tiny_checkpoints):
    """Prompts join mid-generation, in chunks, and a cache too small for all of them preempts some."""
    path = tiny_checkpoints["llama-mha-tied"]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    sync, overlap = both(path, PROMPTS, params, arrive_every=3, num_kv_blocks=12, block_size=4,
                         max_model_len=48, max_num_batched_tokens=8, max_num_seqs=4)
    assert overlap == sync
    assert tokens(overlap) == hf_greedy(path, PROMPTS, params.max_tokens)


def test_stop_token_ends_a_request_mid_batch(tiny_checkpoints):
    """A request stopped by a sampled token has had one more row computed in the step already in flight:
    that row's token is dropped, the others go on, and its blocks come back."""
    path = tiny_checkpoints["llama-gqa-untied"]
    free_run = make_engine(path).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    stop = free_run[1][3]  # the 4th token of the second prompt
    params = SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop])
    sync, overlap = both(path, PROMPTS, params)
    assert overlap == sync
    second = tokens(overlap)[1]
    assert second == free_run[1][:free_run[1].index(stop) + 1] and overlap[1][-1][2] == "stop"


def test_sampling_logprobs_and_penalties_equal_sync(tiny_checkpoints):
    """Seeded draws, logprobs and a penalized request (whose steps wait for the one in flight) alike."""
    path = tiny_checkpoints["qwen2-qkv-bias"]
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=9, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=5, logprobs=0),
              SamplingParams(temperature=1.1, min_p=0.05, seed=8, max_tokens=7, repetition_penalty=1.4,
                             presence_penalty=0.5),
              SamplingParams(temperature=0.7, top_k=6, seed=9, max_tokens=11)]
    sync, overlap = both(path, PROMPTS, params, arrive_every=2)
    assert overlap == sync
    assert [len(t) for t in tokens(overlap)] == [9, 5, 7, 11]


def test_abort_with_a_step_in_flight(tiny_checkpoints):
    engine = make_engine(tiny_checkpoints["llama-gqa-untied"], async_scheduling=True)
    rid = engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=50))
    keep = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=6))
    assert engine.step() == []  # the prompts' step is in flight: nothing read yet
    engine.step()
    engine.abort(rid)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {keep}  # the aborted request's sampled tokens were dropped
    assert_pool_full(engine)


def test_pending_tokens_travel_in_the_packed_step():
    """A decode row whose input was sampled by the step in flight: a placeholder id, its row and source."""
    reqs = [Request(f"r{i}", [3, 4, 5], SamplingParams(max_tokens=8)) for i in range(3)]
    for i, req in enumerate(reqs):
        req.num_computed_tokens, req.block_table = 3, [i]
    reqs[0].output_token_ids = [9]  # read already: its token is known
    reqs[1].num_pending, reqs[1].pending_row = 1, 2
    reqs[2].num_pending, reqs[2].pending_row = 1, 0
    batch = StepBatch.build(SchedulerOutput([(r, 1) for r in reqs], []), block_size=4, num_prev=3)
    assert batch.input_ids.tolist() == [9, 0, 0]
    assert (batch.prev_rows.tolist(), batch.prev_src.tolist(), batch.num_prev) == ([1, 2], [2, 0], 3)
    back = StepBatch.unpack(batch.pack())
    assert (back.prev_rows.tolist(), back.prev_src.tolist(), back.num_prev) == ([1, 2], [2, 0], 3)
    assert back.input_ids.tolist() == [9, 0, 0] and back.positions.tolist() == [3, 3, 3]


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_length_limit_is_not_scheduled_past(tiny_checkpoints, max_tokens):
    """A request whose pending token reaches max_tokens is not given another row."""
    engine = make_engine(tiny_checkpoints["llama-gqa-untied"], async_scheduling=True)
    engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=max_tokens))
    rows = 0
    outs = []
    while engine.has_unfinished():
        plan = engine.scheduler.schedule  # count the rows each step schedules
        scheduled = []

        def spy(plan=plan, scheduled=scheduled):
            out = plan()
            scheduled.extend(out.scheduled)
            return out

        engine.scheduler.schedule = spy
        outs += engine.step()
        del engine.scheduler.schedule
        rows += len(scheduled)
    assert sum(len(o.new_token_ids) for o in outs) == max_tokens
    assert rows == max_tokens  # the prompt's step, then one decode row per further token
    assert_pool_full(engine)


@pytest.mark.parametrize("early", [True, False])
def test_a_transfer_that_ends_before_its_step_is_read_still_frees_the_blocks(tiny_checkpoints, early):
    """Prefill side, asynchronous scheduling: a held request's transfer may end (release) while its step is
    still in flight, before the engine holds it; its blocks go back once it finishes, not never."""
    engine = make_engine(tiny_checkpoints["llama-gqa-untied"], async_scheduling=True)
    rid = engine.add_request(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=1), hold_blocks=True)
    assert engine.step() == []  # launched, not read
    if early:
        engine.release(rid)  # the transfer ended within the step
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finished for o in outs] == [True]
    if not early:
        assert rid in engine.held
        engine.release(rid)
    assert not engine.held
    assert_pool_full(engine)
