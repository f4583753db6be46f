"""Host work of one decode step, without a model: turning the scheduler's plan into the step's tensors
(`StepBatch.build`) and packing them for upload and for a TP gang's peers (`pack`).

    python tools/host.py [--cases 64x1024,256x1024,256x4096] [--iters 50]

Each case is B running sequences of the given context, one new token each, block_size 16, block tables
at random block ids; median milliseconds over --iters calls, after warm-up. The GPU waits for this
work every step (the engine does not overlap it with the previous step), so it is compared with the
decode step's GPU time in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from pdserve.engine.request import Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step import StepBatch

BLOCK_SIZE = 16


def decode_plan(batch: int, context: int, seed: int = 0) -> SchedulerOutput:
    rng = random.Random(seed)
    per_seq = -(-(context + 1) // BLOCK_SIZE)
    ids = rng.sample(range(batch * per_seq * 2), batch * per_seq)
    scheduled = []
    for i in range(batch):
        req = Request(str(i), [1] * context, SamplingParams())
        req.output_token_ids = [2]
        req.num_computed_tokens = context
        req.block_table = ids[i * per_seq:(i + 1) * per_seq]
        scheduled.append((req, 1))
    return SchedulerOutput(scheduled, [])


def median_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="64x1024,256x1024,256x4096", help="BxCONTEXT, comma-separated")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    print(f"{'batch':>6}{'context':>9}{'build ms':>10}{'pack ms':>9}")
    for case in args.cases.split(","):
        batch, context = (int(v) for v in case.lower().split("x"))
        plan = decode_plan(batch, context)
        build = median_ms(lambda plan=plan: StepBatch.build(plan, BLOCK_SIZE), args.iters)
        step = StepBatch.build(plan, BLOCK_SIZE)

        def pack(step=step):
            step.packed = None
            step.pack()

        print(f"{batch:>6}{context:>9}{build:>10.3f}{median_ms(pack, args.iters):>9.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
