"""Tensor-parallel linear layers. Each loads only its own shard; collectives are in `forward`.

Column-parallel layers split the output features (no communication); row-parallel layers
split the input features and all-reduce their partial sums.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.loading import copy_into, full, narrow
from pdserve.engine.parallel import TPGroup


class _Linear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class ColumnParallelLinear(_Linear):
    """y[:, shard] = x @ W[shard].T — the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        self.tp = tp
        super().__init__(out_features // tp.size, in_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        start = self.tp.rank * param.shape[0]
        copy_into(param, narrow(loaded, 0, start, param.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate/up)."""

    def __init__(self, in_features: int, out_sizes: list[int], tp: TPGroup, bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), tp, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int) -> None:
        size = self.out_sizes[shard_id] // self.tp.size
        offset = sum(self.out_sizes[:shard_id]) // self.tp.size
        copy_into(param[offset : offset + size], narrow(loaded, 0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one GEMM. Query heads are split across ranks; KV heads are split when
    there are at least as many as ranks, else each rank keeps (a replica of) the one its
    query heads use."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: TPGroup, bias: bool):
        assert num_heads % tp.size == 0, f"num_heads {num_heads} not divisible by tp_size {tp.size}"
        if num_kv_heads >= tp.size:
            assert num_kv_heads % tp.size == 0, f"num_kv_heads {num_kv_heads} not divisible by {tp.size}"
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size  # local
        self.num_kv_heads = max(1, num_kv_heads // tp.size)  # local
        self.total_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out * tp.size, tp, bias)

    def kv_head_start(self) -> int:
        """First global kv head this rank holds."""
        if self.total_kv_heads >= self.tp.size:
            return self.tp.rank * self.num_kv_heads
        return self.tp.rank * self.total_kv_heads // self.tp.size

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: str) -> None:
        q, kv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        offset, size, start = {
            "q": (0, q, self.tp.rank * q),
            "k": (q, kv, self.kv_head_start() * d),
            "v": (q + kv, kv, self.kv_head_start() * d),
        }[shard_id]
        copy_into(param[offset : offset + size], narrow(loaded, 0, start, size))


class RowParallelLinear(_Linear):
    """y = all_reduce(x[:, shard] @ W[:, shard].T) + b — the input arrives sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        self.tp = tp
        super().__init__(out_features, in_features // tp.size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            copy_into(param, full(loaded))
            return
        copy_into(param, narrow(loaded, 1, self.tp.rank * param.shape[1], param.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias
