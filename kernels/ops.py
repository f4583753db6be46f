"""The kernel entry points the engine imports: the Triton kernel for CUDA tensors, the torch reference else.

Each name keeps its reference's signature and docstring; the family modules hold the contracts.
"""
import functools
from collections.abc import Callable

from pdserve.kernels import gemm
from pdserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton
from pdserve.kernels.attention_decode import paged_decode_attention_ref, paged_decode_attention_triton
from pdserve.kernels.attention_prefill import paged_prefill_attention_ref, paged_prefill_attention_triton
from pdserve.kernels.block_copy import (
    copy_blocks_ref,
    copy_blocks_triton,
    gather_blocks_into_ref,
    gather_blocks_into_triton,
    gather_blocks_ref,
    gather_blocks_triton,
    scatter_blocks_ref,
    scatter_blocks_triton,
)
from pdserve.kernels.gemm import linear
from pdserve.kernels.kv_store import store_kv_ref, store_kv_triton
from pdserve.kernels.norm import (
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm_ref,
    rms_norm_triton,
)
from pdserve.kernels.rope import rope_store_kv_ref, rope_store_kv_triton


def _by_device(triton_fn: Callable, ref_fn: Callable) -> Callable:
    # The first argument decides: every entry point takes there a tensor that lives where the work runs.
    @functools.wraps(ref_fn)
    def run(first, *args, **kwargs):
        return (triton_fn if first.is_cuda else ref_fn)(first, *args, **kwargs)

    return run


store_kv = _by_device(store_kv_triton, store_kv_ref)
paged_decode_attention = _by_device(paged_decode_attention_triton, paged_decode_attention_ref)
paged_prefill_attention = _by_device(paged_prefill_attention_triton, paged_prefill_attention_ref)
rms_norm = _by_device(rms_norm_triton, rms_norm_ref)
fused_add_rms_norm = _by_device(fused_add_rms_norm_triton, fused_add_rms_norm_ref)
rope_store_kv = _by_device(rope_store_kv_triton, rope_store_kv_ref)
silu_and_mul = _by_device(silu_and_mul_triton, silu_and_mul_ref)
gather_blocks = _by_device(gather_blocks_triton, gather_blocks_ref)
gather_blocks_into = _by_device(gather_blocks_into_triton, gather_blocks_into_ref)
scatter_blocks = _by_device(scatter_blocks_triton, scatter_blocks_ref)
copy_blocks = _by_device(copy_blocks_triton, copy_blocks_ref)



def linear_silu_and_mul(x, weight):
    """silu_and_mul(linear(x, weight)) for a merged [gate; up] weight [2I, K]: one skinny kernel where the
    GEMM table has an unsplit config for the shape (decode-sized CUDA x), the two calls otherwise."""
    config = gemm.gated_config(x, weight)
    if config is None:
        return silu_and_mul(linear(x, weight))
    return gemm.skinny_linear_silu_and_mul_triton(x, weight, config)


__all__ = [
    "copy_blocks", "fused_add_rms_norm", "gather_blocks", "gather_blocks_into", "linear", "linear_silu_and_mul",
    "paged_decode_attention",
    "paged_prefill_attention", "rms_norm", "rope_store_kv", "scatter_blocks", "silu_and_mul", "store_kv",
]
