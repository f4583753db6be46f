"""StepBatch.build against a per-token reading of the plan; a request's numpy block table follows its list."""
import random

import torch

from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step import StepBatch

BS = 4


def request(rid: int, prompt: int, output: int, computed: int, blocks: list[int]) -> Request:
    req = Request(str(rid), [100 + rid * 1000 + i for i in range(prompt)], SamplingParams())
    req.output_token_ids = [900 + rid * 1000 + i for i in range(output)]
    req.num_computed_tokens = computed
    req.block_table = blocks
    return req


def expected(plan: SchedulerOutput) -> dict:
    """Token by token, straight from the definitions."""
    ids, pos, slots, q_start, lens, rows, tables = [], [], [], [0], [], [], []
    for req, n in plan.scheduled:
        seq = req.prompt_token_ids + req.output_token_ids
        for p in range(req.num_computed_tokens, req.num_computed_tokens + n):
            ids.append(seq[p])
            pos.append(p)
            slots.append(req.block_table[p // BS] * BS + p % BS)
        q_start.append(q_start[-1] + n)
        lens.append(req.num_computed_tokens + n)
        tables.append(req.block_table)
        if req.num_computed_tokens + n == len(seq):
            rows.append(q_start[-1] - 1)
    width = max(map(len, tables))
    return {"input_ids": ids, "positions": pos, "slot_mapping": slots, "query_start_loc": q_start,
            "seq_lens": lens, "logits_indices": rows, "block_tables": [t + [0] * (width - len(t)) for t in tables]}


def test_build_matches_the_plan_token_by_token():
    rng = random.Random(0)
    for trial in range(30):
        scheduled = []
        for rid in range(rng.randint(1, 9)):
            prompt, output = rng.randint(1, 40), rng.randint(0, 20)
            total = prompt + output
            computed = rng.randint(0, total - 1)
            n = rng.choice([1, total - computed, rng.randint(1, total - computed)])
            blocks = rng.sample(range(500), -(-(computed + n) // BS) + rng.randint(0, 2))  # tables may run ahead
            scheduled.append((request(rid, prompt, output, computed, blocks), n))
        plan = SchedulerOutput(scheduled, [])
        batch, want = StepBatch.build(plan, BS), expected(plan)
        for name, values in want.items():
            got = getattr(batch, name)
            assert got.tolist() == values, (trial, name)
        assert batch.block_tables.dtype == batch.query_start_loc.dtype == batch.seq_lens.dtype == torch.int32
        assert batch.input_ids.dtype == batch.positions.dtype == batch.slot_mapping.dtype == torch.int64
        assert batch.decode_only == all(n == 1 for _, n in scheduled)
        assert StepBatch.unpack(batch.pack()).block_tables.tolist() == want["block_tables"]


def test_block_table_array_follows_appends_and_replacement():
    req = request(0, 3, 0, 0, [])
    assert req.block_table_array().tolist() == []
    for grow in ([5], [6, 7], list(range(10, 60))):  # appended in place, past the buffer's capacity
        req.block_table += grow
        assert req.block_table_array().tolist() == req.block_table
    req.block_table = [1, 2]  # freed and given new blocks: a new list
    assert req.block_table_array().tolist() == [1, 2]
    req.block_table = [3]
    req.block_table += [4, 8]
    assert req.block_table_array().tolist() == [3, 4, 8]
