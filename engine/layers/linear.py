"""Tensor-parallel linear layers. Each loads only its own shard; collectives are in `forward`.

Column-parallel layers split the output features (no communication); row-parallel layers
split the input features and all-reduce their partial sums.
"""
from __future__ import annotations

import torch
from torch import nn

from pdserve.engine.layers.loading import copy_into, full, narrow
from pdserve.engine.parallel import TPGroup, kv_head_range, q_head_range
from pdserve.kernels import ops


class _Linear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class ColumnParallelLinear(_Linear):
    """y[:, shard] = x @ W[shard].T — the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        assert out_features % tp.size == 0, f"{out_features} features do not split over tp_size {tp.size}"
        self.tp = tp
        super().__init__(out_features // tp.size, in_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.tp.rank * param.shape[0]
        copy_into(param, narrow(loaded, 0, start, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate/up)."""

    def __init__(self, in_features: int, out_sizes: list[int], tp: TPGroup, bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        size = self.out_sizes[shard_id] // self.tp.size
        offset = sum(self.out_sizes[:shard_id]) // self.tp.size
        copy_into(param[offset : offset + size], narrow(loaded, 0, self.tp.rank * size, size))

    def forward_silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a [gate; up] projection: one kernel for decode-sized GPU batches."""
        assert len(self.out_sizes) == 2 and self.out_sizes[0] == self.out_sizes[1], "a [gate; up] projection"
        if self.bias is not None:
            return ops.silu_and_mul(ops.linear(x, self.weight, self.bias))
        return ops.linear_silu_and_mul(x, self.weight)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one GEMM. Each rank holds whole KV heads and the query heads they serve
    (`kv_head_range` / `q_head_range`): split when there are at least as many KV heads as
    ranks (unevenly if need be), replicated otherwise."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: TPGroup, bias: bool):
        self.head_dim = head_dim
        self.q_range = q_head_range(num_heads, num_kv_heads, tp.size, tp.rank)
        self.kv_range = kv_head_range(num_kv_heads, tp.size, tp.rank)
        self.num_heads = self.q_range[1] - self.q_range[0]  # local
        self.num_kv_heads = self.kv_range[1] - self.kv_range[0]  # local
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim  # this rank's rows
        # NOTE: `out * tp.size` is not the model's qkv width when heads split unevenly; it is what the
        # parent divides by tp.size to get this rank's rows back.
        super().__init__(hidden, out * tp.size, tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q, kv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        offset, size, start = {
            "q": (0, q, self.q_range[0] * d),
            "k": (q, kv, self.kv_range[0] * d),
            "v": (q + kv, kv, self.kv_range[0] * d),
        }[shard_id]
        copy_into(param[offset : offset + size], narrow(loaded, 0, start, size))


class RowParallelLinear(_Linear):
    """y = all_reduce(x[:, shard] @ W[:, shard].T) + b — the input arrives sharded.

    `input_range` ([start, end) of the input features this rank holds) defaults to an even
    split; attention's output projection passes its (possibly uneven) head range.
    `reduce_results=False`: `forward` returns this rank's partial sums, and `forward_add_norm` reduces
    them fused with the residual add + RMSNorm that follows.
    """

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False,
                 input_range: tuple[int, int] | None = None, reduce_results: bool = True):
        assert reduce_results or not bias, "the bias is added after the reduction, which the caller then owns"
        self.tp, self.reduce_results = tp, reduce_results
        if input_range is None:
            assert in_features % tp.size == 0, f"{in_features} features do not split over tp_size {tp.size}"
            per = in_features // tp.size
            input_range = (tp.rank * per, (tp.rank + 1) * per)
        self.input_start = input_range[0]
        super().__init__(out_features, input_range[1] - input_range[0], bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            copy_into(param, full(loaded))
            return
        copy_into(param, narrow(loaded, 1, self.input_start, param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.linear(x, self.weight)
        if not self.reduce_results:
            return y  # partial sums
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def forward_add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm, slot: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(y + residual), y + residual) for y = this layer's reduced output and `norm` an RMSNorm: the
        reduction fused with the add + norm (`TPGroup.linear_all_reduce_add_rms_norm`; `slot` as it says)."""
        assert not self.reduce_results, "a layer that reduces its own output has nothing left to fuse"
        if self.tp.size == 1:
            return norm(ops.linear(x, self.weight), residual)
        return self.tp.linear_all_reduce_add_rms_norm(x, self.weight, residual, norm.weight, norm.eps, slot)
