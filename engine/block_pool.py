"""The KV block pool: reference-counted blocks of `block_size` token slots."""
from __future__ import annotations

from collections import deque


class BlockPool:
    """Hands out block ids. A block returns to the free list when its last reference goes."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        assert self.can_allocate(n), f"asked for {n} blocks, {len(self.free_ids)} free"
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.ref_counts[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        """One more owner for blocks already allocated (e.g. a shared prefix)."""
        for i in ids:
            assert self.ref_counts[i] > 0, f"block {i} is free"
            self.ref_counts[i] += 1

    def free(self, ids: list[int]) -> None:
        for i in ids:
            assert self.ref_counts[i] > 0, f"block {i} freed twice"
            self.ref_counts[i] -= 1
            if self.ref_counts[i] == 0:
                self.free_ids.append(i)
