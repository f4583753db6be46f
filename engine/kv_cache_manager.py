"""Which cache blocks each request owns: grows a request's block table as its tokens grow."""
from __future__ import annotations

from pdserve.engine.block_pool import BlockPool
from pdserve.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_table))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_blocks_needed(request, num_new_tokens))

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Make room in `request`'s blocks for `num_new_tokens` more tokens."""
        request.block_table += self.pool.allocate(self.num_blocks_needed(request, num_new_tokens))

    def free(self, request: Request) -> None:
        self.pool.free(request.block_table)
        request.block_table = []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks
