"""One request's record: its tokens, how many of them the KV cache holds, its blocks."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"  # decode side: blocks reserved, the prompt's KV on its way
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(eq=False)
class Request:
    """`num_computed_tokens` catches up with `num_tokens`; when it does, a token is sampled.

    There is no prefill or decode phase: a fresh prompt, a chunk of one, a recompute after
    preemption and a decode step are all "compute the tokens not yet in the cache".
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    generator: torch.Generator | None = None
    # Prefill side of disaggregation: the request's KV is shipped once its prompt is computed, so its blocks
    # outlive it (a delayed free): the engine keeps them until `LLMEngine.release`.
    hold_blocks: bool = False
    # Asynchronous scheduling: tokens sampled on the device whose ids the host has not read yet (at most one
    # when a step is scheduled), and that token's row among its step's sampled rows.
    num_pending: int = 0
    pending_row: int = -1
    # block_table as int32 numpy for StepBatch.build: (the list it mirrors, how much of it, the buffer)
    _table_np: tuple | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        """Prompt + output, counting the sampled tokens not read yet (num_pending)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_known_tokens(self) -> int:
        """Prompt + output whose ids the host holds."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the whole sequence each step. A pending
        token (not read yet) reads as 0: the step that computes it takes its id from the device."""
        num_prompt = len(self.prompt_token_ids)
        missing = max(0, end - self.num_known_tokens)
        if start >= num_prompt:
            ids = self.output_token_ids[start - num_prompt : end - num_prompt]
        else:
            ids = self.prompt_token_ids[start:end] + self.output_token_ids[: max(0, end - num_prompt)]
        return ids + [0] * missing if missing else ids

    def block_table_array(self) -> np.ndarray:
        """`block_table` as int32 numpy, updated by its new tail only. The list only grows while it is
        this request's (KVCacheManager appends to it) and is replaced, not edited, when freed."""
        table, cached = self.block_table, self._table_np
        n = len(table)
        if cached is None or cached[0] is not table or cached[1] > n:
            buf = np.empty(max(16, 2 * n), dtype=np.int32)
            buf[:n] = table
        else:
            _, done, buf = cached
            if n > buf.size:
                buf = np.concatenate([buf[:done], np.empty(2 * n - done, dtype=np.int32)])
            buf[done:n] = table[done:]
        self._table_np = (table, n, buf)
        return buf[:n]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """The finish status after the latest token, or None to keep going."""
        params, last = self.sampling_params, self.output_token_ids[-1]
        if (not params.ignore_eos and last in self.eos_token_ids) or last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(self.output_token_ids) >= params.max_tokens or self.num_known_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def ends_by_length(self, max_model_len: int) -> bool:
        """Its pending tokens alone reach max_tokens or max_model_len: it ends when they are read, so
        scheduling another token for it would be wasted."""
        return (len(self.output_token_ids) + self.num_pending >= self.sampling_params.max_tokens
                or self.num_tokens >= max_model_len)
