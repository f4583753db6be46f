"""Scheduler and block pool behaviour from small factories (no model)."""
from __future__ import annotations

import pytest

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler


def create_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=32, max_model_len=256):
    return Scheduler(KVCacheManager(num_blocks, block_size), max_num_seqs, max_tokens, max_model_len)


def create_requests(lengths, max_tokens=4):
    return [Request(f"r{i}", list(range(3, 3 + n)), SamplingParams(temperature=0, max_tokens=max_tokens))
            for i, n in enumerate(lengths)]


def run_step(sched, token=7):
    plan = sched.schedule()
    sampling = [r for r, n in plan.scheduled if r.num_computed_tokens + n == r.num_tokens]
    sched.launched(plan, sampling)
    sched.resolve([(r, token) for r in sampling])
    return plan


def test_block_pool_check_then_commit_and_refcounts():
    pool = BlockPool(4)
    assert pool.can_allocate(4) and not pool.can_allocate(5)
    ids = pool.allocate(3)
    pool.share(ids[:1])
    pool.free(ids)
    assert pool.num_free_blocks == 3  # the shared block still has an owner
    pool.free(ids[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free(ids[:1])


def test_budget_chunks_prompts_and_serves_running_first():
    sched = create_scheduler(max_tokens=10)
    a, b = create_requests([6, 9])
    sched.add(a)
    sched.add(b)
    plan = run_step(sched)
    assert [(r.request_id, n) for r, n in plan.scheduled] == [("r0", 6), ("r1", 4)]
    plan = run_step(sched)  # r0 decodes 1 token, r1 finishes its prompt with 5
    assert [(r.request_id, n) for r, n in plan.scheduled] == [("r0", 1), ("r1", 5)]
    assert a.output_token_ids == [7, 7] and b.output_token_ids == [7]


def test_max_num_seqs_bounds_the_running_batch():
    sched = create_scheduler(max_num_seqs=2)
    for r in create_requests([2, 2, 2]):
        sched.add(r)
    plan = run_step(sched)
    assert len(plan.scheduled) == 2 and len(sched.waiting) == 1


def test_preempts_newest_and_never_drops():
    sched = create_scheduler(num_blocks=3, block_size=4, max_tokens=64)
    reqs = create_requests([4, 4, 4], max_tokens=4)
    for r in reqs:
        sched.add(r)
    run_step(sched)  # all three prompts fill the 3 blocks
    plan = run_step(sched)  # each decode needs a new block: newest first, r1 preempts itself
    assert plan.preempted == [reqs[2], reqs[1]] and reqs[2].status == RequestStatus.PREEMPTED
    assert [r for r, _ in plan.scheduled] == [reqs[0]]
    assert reqs[2].num_computed_tokens == 0 and reqs[2].block_table == []
    while sched.has_unfinished():
        run_step(sched)
    assert all(len(r.output_token_ids) == 4 for r in reqs)
    assert sched.kv.num_free_blocks == 3


def test_finished_requests_free_blocks_at_once():
    sched = create_scheduler()
    [r] = create_requests([5], max_tokens=1)
    sched.add(r)
    run_step(sched)
    assert r.status == RequestStatus.FINISHED_LENGTH and sched.kv.num_free_blocks == 64


def test_stop_token_and_eos():
    sched = create_scheduler()
    r = Request("s", [3, 4], SamplingParams(temperature=0, max_tokens=9, stop_token_ids=(7,)))
    e = Request("e", [3, 4], SamplingParams(temperature=0, max_tokens=9), eos_token_ids=(7,))
    i = Request("i", [3, 4], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), eos_token_ids=(7,))
    for x in (r, e, i):
        sched.add(x)
    run_step(sched)
    assert r.status == e.status == RequestStatus.FINISHED_STOPPED
    assert i.status == RequestStatus.RUNNING


def test_token_ids_range_spans_prompt_and_output():
    r = Request("r", [3, 4, 5], SamplingParams(), output_token_ids=[6, 7])
    ranges = [(0, 2), (1, 5), (2, 4), (3, 5), (4, 5)]
    assert [r.token_ids_range(s, e) for s, e in ranges] == [[3, 4], [4, 5, 6, 7], [5, 6], [6, 7], [7]]
