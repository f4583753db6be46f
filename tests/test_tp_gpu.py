"""TP=2 on two GPUs (small all-reduces over symmetric peer memory, the rest over NCCL) gives the
fp32 greedy tokens of TP=1."""
from __future__ import annotations

import pytest
import torch

from conftest import make_engine
from pdserve.config import load_config
from pdserve.engine.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
# A fixed cache: sized from free memory, the TP=1 engine (still alive on GPU 0) would leave rank 0 none.
GPU = {"device": "cuda", "num_kv_blocks": 256}


def test_tp2_nccl_equals_tp1(tiny_checkpoints):
    import ray

    from pdserve.cluster.tp_gang import NCCL_ENV, TPGang

    path = tiny_checkpoints["llama-gqa-untied"]
    prompts = [[5, 9, 33, 7, 100, 3], [11, 12, 13], list(range(3, 60))]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    expected = make_engine(path, **GPU).generate(prompts, params)
    ray.init(num_gpus=2, include_dashboard=False, logging_level="ERROR", runtime_env={"env_vars": NCCL_ENV})
    try:
        gang = TPGang(load_config(None, model=path, dtype="float32", **GPU), 2)
        try:
            assert gang.symmetric_all_reduce  # the decode steps' all-reduces took the one-shot path
            assert gang.generate(prompts, params) == expected
            free, total = gang.free_blocks()
            assert free == total
        except BaseException:
            gang.shutdown()
            raise
        # every rank left the NCCL group together (its teardown is collective): nothing had to be killed
        assert gang.shutdown() is True
    finally:
        ray.shutdown()
