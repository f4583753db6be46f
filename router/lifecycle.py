"""One request's life in the router, as an explicit state machine.

    QUEUED -> LEASED -> PREFILLING -> TRANSFERRING -> DECODING -> FINISHED | FAILED | ABORTED
    (colocated: QUEUED -> DECODING -> ...)

A request leaves QUEUED when it has an admission slot (and, disaggregated, a decode lease); every later
state waits for an event from a worker — the first token from prefill, tokens from decode, a failure — and
each such wait is bounded (`next_event`): a worker that says nothing for that long fails the request with
UNAVAILABLE, so no client waits on a dead peer. Events arrive from the workers' poll tasks (`push`); tokens
that piled up while the request's consumer was busy come out of `next_event` together, as one output.
"""
from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from dataclasses import dataclass, field

from pdserve.errors import ErrorCode, PdserveError
from pdserve.messages import RequestFailure, TokenOutput


class RequestState(enum.Enum):
    QUEUED = "queued"
    LEASED = "leased"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"

    @property
    def done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.FAILED, RequestState.ABORTED)


# The transitions the router makes; anything else is a bug (asserted).
_NEXT = {
    RequestState.QUEUED: {RequestState.LEASED, RequestState.DECODING},
    RequestState.LEASED: {RequestState.PREFILLING},
    RequestState.PREFILLING: {RequestState.TRANSFERRING},
    RequestState.TRANSFERRING: {RequestState.DECODING},
    RequestState.DECODING: set(),
}


class StreamError(PdserveError):
    """A request failed on a worker; carries the worker's error code. `retryable`: running it again on
    other workers may succeed (a KV transfer failed); `lost`: the worker holding it died (its role)."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool = False, lost: str | None = None):
        super().__init__(message)
        self.code, self.retryable, self.lost = code, retryable, lost


@dataclass
class RequestStream:
    request_id: str
    num_prompt_tokens: int
    state: RequestState = RequestState.QUEUED
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    attempt: int = 0
    avoid: set[str] = field(default_factory=set)  # workers an earlier attempt's transfer failed on
    worker_id: str = ""  # the id the workers know this attempt by (`<request_id>` then `<request_id>#<n>`)
    # the workers holding the current attempt (abort goes there)
    prefill: object | None = None
    decode: object | None = None
    events: deque = field(default_factory=deque)  # TokenOutput | RequestFailure | StreamError, in arrival order
    # seconds spent in each state so far (every attempt's), and when the current one began
    stage_s: dict[str, float] = field(default_factory=dict)
    entered: float = field(default_factory=time.monotonic)
    # while `next_event` waits on an empty `events`: the future it waits on (True: an event came; False: the wait
    # timed out) and the wait's deadline; one timer per request, moved on lazily (`_expire`)
    _waiter: asyncio.Future | None = field(default=None, init=False, repr=False)
    _deadline: float = field(default=0.0, init=False, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)

    def restart(self, worker_id: str) -> None:
        """A new attempt (a retry, a migration) under a new id for the workers: back to QUEUED, and events
        still queued from the previous attempt dropped."""
        self.worker_id, self.prefill, self.decode = worker_id, None, None
        self._enter(RequestState.QUEUED)
        self.events = deque()

    def move(self, state: RequestState) -> None:
        if not state.done:
            assert state in _NEXT[self.state], f"{self.request_id}: {self.state.value} -> {state.value}"
        self._enter(state)

    def _enter(self, state: RequestState) -> None:
        now = time.monotonic()
        self.stage_s[self.state.value] = self.stage_s.get(self.state.value, 0.0) + now - self.entered
        self.state, self.entered = state, now

    # --- from the poll tasks ------------------------------------------------------------------
    def push(self, event: TokenOutput | RequestFailure | StreamError) -> None:
        self.events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)

    async def next_event(self, timeout_s: float, waiting_for: str) -> TokenOutput:
        """The tokens that arrived since the last call, as one output; a failure or silence past `timeout_s`
        raises (after the tokens that came before it)."""
        if not self.events:
            loop = asyncio.get_running_loop()
            self._waiter, self._deadline = loop.create_future(), loop.time() + timeout_s
            if self._timer is None or self._timer.when() > self._deadline:
                self.close()
                self._timer = loop.call_at(self._deadline, self._expire)
            try:
                if not await self._waiter:
                    raise StreamError(ErrorCode.UNAVAILABLE,
                                      f"no {waiting_for} within {timeout_s:.0f}s ({self.state.value})")
            finally:
                self._waiter = None
        event = self.events.popleft()
        if isinstance(event, StreamError):
            raise event
        if isinstance(event, RequestFailure):
            raise StreamError(ErrorCode[event.code], event.message, retryable=event.retry)
        while self.events and isinstance(self.events[0], TokenOutput) and event.finish_reason is None:
            more = self.events.popleft()
            event = TokenOutput(event.request_id, event.token_ids + more.token_ids, more.finish_reason,
                                event.logprobs + more.logprobs)
        return event

    def close(self) -> None:
        """The request left the router: its timer goes (`next_event` sets it again if it waits)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        """The timer: times out the wait in progress, or moves on to its deadline.

        NOTE: a timer per wait (asyncio.timeout) costs a heap push and a cancel per streamed message; this one
        fires at most once per `timeout_s` of a request's life.
        """
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return  # not waiting: the next wait sets it again
        loop = self._waiter.get_loop()
        if loop.time() < self._deadline:
            self._timer = loop.call_at(self._deadline, self._expire)
        else:
            self._waiter.set_result(False)
