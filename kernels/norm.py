"""RMSNorm and fused residual-add + RMSNorm, numerically as Hugging Face Llama computes them."""
import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / rms(x)) over the last dim; the statistics in fp32, then cast back as HF does."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); the add happens in the input dtype, as in HF."""
    new_residual = x + residual
    return rms_norm_ref(new_residual, weight, eps), new_residual
