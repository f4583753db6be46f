"""Routing policies: which worker of a pool takes a request. One small interface, three policies."""
from __future__ import annotations

import itertools
from typing import Protocol

from pdserve.router.workers import WorkerHandle


class RoutingPolicy(Protocol):
    def order(self, workers: list[WorkerHandle], num_tokens: int) -> list[WorkerHandle]:
        """Healthy `workers` best first, for a request of `num_tokens` prompt tokens."""
        ...


class RoundRobin:
    def __init__(self):
        self._turn = itertools.count()

    def order(self, workers: list[WorkerHandle], num_tokens: int) -> list[WorkerHandle]:
        if not workers:
            return []
        k = next(self._turn) % len(workers)
        return workers[k:] + workers[:k]


class LeastQueuedTokens:
    """Prefill: the worker with the fewest prompt tokens waiting to be computed (ties: fewer running)."""

    def order(self, workers: list[WorkerHandle], num_tokens: int) -> list[WorkerHandle]:
        return sorted(workers, key=lambda w: (w.queued_tokens(), w.load.running))


class MostFreeBlocks:
    """Decode: the worker with the most free KV blocks, then the fewest running sequences."""

    def order(self, workers: list[WorkerHandle], num_tokens: int) -> list[WorkerHandle]:
        return sorted(workers, key=lambda w: (-w.free_blocks(), w.load.running + w.load.waiting))
