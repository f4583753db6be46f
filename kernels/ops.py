"""The kernel entry points the engine imports: Triton on CUDA tensors, the torch reference elsewhere."""
from pdserve.kernels.activation import silu_and_mul_ref
from pdserve.kernels.attention_decode import paged_decode_attention_ref
from pdserve.kernels.attention_prefill import paged_prefill_attention_ref
from pdserve.kernels.block_copy import gather_blocks_into_ref, gather_blocks_ref, scatter_blocks_ref
from pdserve.kernels.kv_store import store_kv_ref
from pdserve.kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from pdserve.kernels.rope import rope_ref

store_kv = store_kv_ref
paged_decode_attention = paged_decode_attention_ref
paged_prefill_attention = paged_prefill_attention_ref
rms_norm = rms_norm_ref
fused_add_rms_norm = fused_add_rms_norm_ref
rope = rope_ref
silu_and_mul = silu_and_mul_ref
gather_blocks = gather_blocks_ref
gather_blocks_into = gather_blocks_into_ref
scatter_blocks = scatter_blocks_ref

__all__ = [
    "fused_add_rms_norm",
    "gather_blocks",
    "gather_blocks_into",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rope",
    "scatter_blocks",
    "silu_and_mul",
    "store_kv",
]
