"""Admission: at most `max_concurrent` requests run at once, at most `max_queued` wait for a turn; past that a
request is refused at once (RESOURCE_EXHAUSTED), never left to wait without bound."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pdserve.errors import ResourceExhaustedError


class Admission:
    def __init__(self, max_concurrent: int, max_queued: int):
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self._slots = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked() and self.queued >= self.max_queued:
            raise ResourceExhaustedError(
                f"server is at capacity: {self.running} requests running, {self.queued} queued "
                f"(limits.max_concurrent_requests {self.max_concurrent}, max_queued_requests {self.max_queued})"
            )
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
