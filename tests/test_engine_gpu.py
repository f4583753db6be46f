"""The engine on a GPU: the Triton kernels and CUDA graphs under the real model path."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_pool_full, hf_greedy, make_engine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.step import StepBatch

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 9, 33, 7, 100, 3, 17, 250, 14, 99, 8], [11, 12, 13], list(range(3, 70))]
# Several engines live in one test process: give each a fixed cache instead of 90% of the GPU.
GPU = {"device": "cuda", "num_kv_blocks": 256}


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen3-qk-norm", "mistral-sliding-window"])
def test_fp32_on_gpu_equals_transformers_greedy(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    engine = make_engine(path, **GPU)
    assert engine.runner.graphs is not None  # decode steps replay CUDA graphs
    assert engine.generate(PROMPTS, params) == hf_greedy(path, PROMPTS, params.max_tokens)
    assert_pool_full(engine)


def teacher_forced_logits(engine, ids: list[int]) -> torch.Tensor:
    """Logits of every position of `ids` in one prefill step: [len(ids), vocab]."""
    rid = engine.add_request(ids, SamplingParams(max_tokens=1))
    req = engine.requests[rid]
    engine.kv.allocate(req, len(ids))
    batch = StepBatch.build(SchedulerOutput([(req, len(ids))], preempted=[]), engine.config.block_size)
    batch.logits_indices = torch.arange(len(ids))
    return engine.execute(batch)


def test_bf16_teacher_forced_logits_close_to_fp32(tiny_checkpoints):
    """bf16 logits stay within 10% (relative to the largest |logit|) of the fp32 reference, and no
    further from it than 1.5x what transformers itself gets in bf16 on the same weights."""
    from transformers import AutoModelForCausalLM

    path, ids = tiny_checkpoints["llama-gqa-untied"], PROMPTS[2]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        want = ref(x).logits[0].float()
        hf_bf16 = ref.to(torch.bfloat16)(x).logits[0].float()
    scale = want.abs().max()
    hf_err = ((hf_bf16 - want).abs().max() / scale).item()
    got = teacher_forced_logits(make_engine(path, dtype="bfloat16", **GPU), ids)
    err = ((got - want).abs().max() / scale).item()
    assert err < 0.10 and err <= 1.5 * hf_err + 0.01, f"relative error {err:.4f} (transformers bf16: {hf_err:.4f})"


def test_memory_sized_cache_with_a_budget_above_max_model_len(tiny_checkpoints):
    """Sizing the cache from GPU memory runs one forward over the whole token budget; a budget larger than
    max_model_len must not read past the rotary table (it did: an illegal memory access)."""
    path = tiny_checkpoints["llama-gqa-untied"]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    engine = make_engine(path, device="cuda", max_model_len=128, max_num_batched_tokens=4096,
                         gpu_memory_utilization=0.1)
    assert engine.runner.num_blocks > 256  # sized from memory, not given
    assert engine.generate(PROMPTS, params) == hf_greedy(path, PROMPTS, params.max_tokens)
    assert_pool_full(engine)
