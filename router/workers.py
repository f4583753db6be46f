"""The router's view of one worker: its actor, what it last reported, and the long-poll that feeds every
request stream it serves.

Each worker has one poll task: it asks for the worker's `WorkerReport` (which waits until the worker has
something, bounded) and hands each sequence's new tokens to that request's stream. A poll that fails or
does not answer in time marks the worker dead and fails every request it holds with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import ray

from pdserve.messages import WorkerInfo, WorkerLoad, WorkerReport

log = logging.getLogger(__name__)

POLL_WAIT_S = 0.5  # a worker with nothing to say answers its poll after this long


@dataclass(eq=False)
class WorkerHandle:
    role: str  # "prefill", "decode", "colocated"
    actor: object  # the Ray actor handle
    info: WorkerInfo
    load: WorkerLoad
    healthy: bool = True
    error: str | None = None
    # prompt tokens / blocks handed to it since its last report (so routing between reports is not blind)
    sent_tokens: int = 0
    reserved_blocks: int = 0

    @property
    def name(self) -> str:
        return self.info.name

    def queued_tokens(self) -> int:
        return self.load.queued_tokens + self.sent_tokens

    def free_blocks(self) -> int:
        return self.load.free_blocks - self.reserved_blocks

    def took_report(self, report: WorkerReport) -> None:
        self.load, self.sent_tokens, self.reserved_blocks = report.load, 0, 0


async def poll_forever(worker: WorkerHandle, timeout_s: float, deliver: Callable[[WorkerHandle, WorkerReport], None],
                       died: Callable[[WorkerHandle, str], None], stopping: asyncio.Event) -> None:
    """Feed `deliver` with the worker's reports until `stopping`; on a failed or silent poll call `died`."""
    while not stopping.is_set():
        try:
            report = await asyncio.wait_for(worker.actor.poll.remote(POLL_WAIT_S), POLL_WAIT_S + timeout_s)
        except asyncio.TimeoutError:
            died(worker, f"{worker.name} did not answer within {timeout_s:.0f}s")
            return
        except ray.exceptions.RayTaskError as e:
            died(worker, f"{worker.name} failed: {e.cause}")
            return
        except ray.exceptions.RayError as e:
            died(worker, f"{worker.name} is gone ({type(e).__name__})")
            return
        worker.took_report(report)
        deliver(worker, report)
