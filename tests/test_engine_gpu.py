"""The engine on a GPU: the Triton kernels under the real model path."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_pool_full, hf_greedy, make_engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step import StepBatch

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 9, 33, 7, 100, 3, 17, 250, 14, 99, 8], [11, 12, 13], list(range(3, 70))]


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen3-qk-norm", "mistral-sliding-window"])
def test_fp32_on_gpu_equals_transformers_greedy(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    engine = make_engine(path, device="cuda")
    assert engine.generate(PROMPTS, params) == hf_greedy(path, PROMPTS, params.max_tokens)
    assert_pool_full(engine)


def test_bf16_teacher_forced_logits_close_to_fp32(tiny_checkpoints):
    """bf16 logits of every position stay within 5% (relative to the largest |logit|) of fp32."""
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints["llama-gqa-untied"]
    ids = PROMPTS[2]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids], device="cuda")).logits[0].float()
    engine = make_engine(path, device="cuda", dtype="bfloat16")
    rid = engine.add_request(ids, SamplingParams(max_tokens=1))
    req = engine.requests[rid]
    engine.kv.allocate(req, len(ids))
    plan = type("Plan", (), {"scheduled": [(req, len(ids))]})()
    batch = StepBatch.build(plan, engine.config.block_size)
    batch.logits_indices = torch.arange(len(ids))
    got = engine.execute(batch)
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.05, f"relative error {err:.4f}"
