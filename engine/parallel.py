"""Tensor-parallel group handed explicitly to every TP layer (no process-global state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its gang. `group` is None when `size == 1`: no collectives at all."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def shard(self, n: int) -> tuple[int, int]:
        """(start, size) of this rank's even share of `n` items (n divisible by size)."""
        assert n % self.size == 0, f"{n} is not divisible by tp_size {self.size}"
        per = n // self.size
        return self.rank * per, per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n] in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


SINGLE = TPGroup()
