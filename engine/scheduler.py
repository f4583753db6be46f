"""Continuous batching by token counts.

There is no prefill phase and no decode phase: each request has `num_computed_tokens`
(tokens whose KV is in the cache) and `num_tokens` (prompt + generated). Each step gives
requests a share of the `max_num_batched_tokens` budget so they catch up: a running
decode gets 1 token, a prompt gets as much as fits (the rest waits for the next step:
chunked prefill). Running requests are served first, oldest first; waiting ones join
between steps. When blocks run out, the newest running request is preempted: its
blocks are freed and it returns to the front of the queue to be recomputed. Nothing is
ever dropped.

A step is `launched` (its tokens count as computed, its samples as pending) and later
`resolve`d with the sampled ids. With asynchronous scheduling the next step is planned
in between: a request's pending token is scheduled like any other (the step takes its
id from the device), unless it already ends the request by length.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's plan: which requests compute how many new tokens (in batch order)."""

    scheduled: list[tuple[Request, int]]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def add_computed(self, request: Request) -> None:
        """A request whose prompt's KV is already in its blocks (imported): it joins the running batch now
        when there is a seat, else the front of the queue — it holds its blocks, so it must not wait behind
        a request that waits for blocks."""
        request.status = RequestStatus.RUNNING
        if len(self.running) < self.max_num_seqs:
            self.running.append(request)
        else:
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and req.ends_by_length(self.max_model_len):
                i += 1  # its last token is on its way: nothing left to compute
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._make_room(req, n, preempted):
                break  # `req` itself was the newest and got preempted
            scheduled.append((req, n))
            budget -= n
            i += 1
        if not preempted:
            self._admit_waiting(budget, scheduled)
        return SchedulerOutput(scheduled, preempted)

    def _make_room(self, req: Request, n: int, preempted: list[Request]) -> bool:
        while not self.kv.can_allocate(req, n):
            victim = self.running.pop()  # the newest
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.kv.allocate(req, n)
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _admit_waiting(self, budget: int, scheduled: list[tuple[Request, int]]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.can_allocate(req, n):
                break  # FCFS: later arrivals do not jump the queue
            self.waiting.popleft()
            self.kv.allocate(req, n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n

    def launched(self, output: SchedulerOutput, sampling: list[Request]) -> None:
        """The step is enqueued: its tokens are computed, and each of `sampling` awaits one sampled token."""
        for req, n in output.scheduled:
            req.num_computed_tokens += n
        for row, req in enumerate(sampling):
            req.num_pending += 1
            req.pending_row = row

    def resolve(self, sampled: list[tuple[Request, int]]) -> tuple[list[tuple[Request, int]], list[Request]]:
        """A launched step's tokens are known: append them. Returns the tokens kept (not those of requests
        that ended meanwhile: aborted, or stopped by the token before) and the requests that finished."""
        kept, finished = [], []
        for req, token in sampled:
            req.num_pending -= 1
            if req.is_finished:
                continue
            req.append_token(token)
            kept.append((req, token))
            status = req.check_stop(self.max_model_len)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
        return kept, finished

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End `req` wherever it is (waiting or running) and free its blocks at once, unless it holds them
        for a KV transfer (its engine frees them when the transfer ends)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if not req.hold_blocks:
            self.kv.free(req)
        req.status = status
