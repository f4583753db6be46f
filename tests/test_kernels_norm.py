"""RMSNorm and fused add + RMSNorm: references against Hugging Face Llama."""
import pytest
import torch
from pdserve.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from transformers.models.llama.modeling_llama import LlamaRMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_refs_match_hf(dtype):
    hf = LlamaRMSNorm(48, eps=1e-6).to(dtype)
    hf.weight.data = torch.randn(48, dtype=dtype)
    x, res = torch.randn(7, 48, dtype=dtype), torch.randn(7, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x, hf.weight, 1e-6), hf(x))
        y, new_res = fused_add_rms_norm_ref(x, res, hf.weight, 1e-6)
        assert torch.equal(new_res, x + res)
        assert torch.equal(y, hf(x + res))
