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


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the KV heads rank `rank` holds.

    With at least as many KV heads as ranks they are split into contiguous, as-even-as-
    possible ranges (earlier ranks take one more when it does not divide); with fewer,
    each rank holds a replica of the one head its query heads use.
    """
    if num_kv_heads >= tp_size:
        base, extra = divmod(num_kv_heads, tp_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)
    assert tp_size % num_kv_heads == 0, f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}"
    head = rank * num_kv_heads // tp_size
    return head, head + 1


def q_head_range(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the query heads of rank `rank`: always those served by its KV heads."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        start, end = kv_head_range(num_kv_heads, tp_size, rank)
        return start * group, end * group
    ranks_per_head = tp_size // num_kv_heads
    assert group % ranks_per_head == 0, f"{group} query heads per KV head do not split over {ranks_per_head} ranks"
    per = group // ranks_per_head
    return rank * per, (rank + 1) * per
