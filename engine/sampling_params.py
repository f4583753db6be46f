"""Per-request sampling parameters, validated once when the request arrives."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 1024  # each is compared with every new token, on the worker's step loop
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one request (vLLM / OpenAI semantics).

    - `temperature` 0 means greedy; `top_k` None or 0 disables top-k; `top_p` 1 and
      `min_p` 0 disable those filters.
    - `repetition_penalty` (HF semantics) applies to every token seen in the prompt or
      the output: a positive logit is divided by it, a negative one multiplied.
    - `presence_penalty` and `frequency_penalty` (OpenAI semantics) apply to output
      tokens only: `logit -= presence * (count > 0) + frequency * count`.
    - `seed` makes the request's draws reproducible; `logprobs` is the number of top
      logprobs to return per token (0 returns only the chosen token's).

    Every field is checked in `__post_init__`; a bad one raises `InvalidRequestError`
    whose message names the field and the value. Integers given for float fields and
    lists given for `stop_token_ids` are normalized, so equal requests compare equal.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        self._check_int("max_tokens", low=1)
        self._check_float("temperature", ">= 0", lambda v: v >= 0)
        self._check_float("top_p", "in (0, 1]", lambda v: 0 < v <= 1)
        self._check_int("top_k", low=0, optional=True)
        self._check_float("min_p", "in [0, 1]", lambda v: 0 <= v <= 1)
        self._check_int("seed", low=_INT64_MIN, high=_INT64_MAX, optional=True)
        self._check_float("repetition_penalty", "> 0", lambda v: v > 0)
        self._check_float("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        self._check_float("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)
        self._check_stop_token_ids()
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self._check_int("logprobs", low=0, high=MAX_LOGPROBS, optional=True)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Sampling reads the whole output so far (repetition, presence or frequency penalty)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def _check_int(self, name: str, low: int, high: int | None = None, optional: bool = False):
        value = getattr(self, name)
        if value is None and optional:
            return
        # NOTE: bool is a subclass of int; `top_k=True` is a client bug, not 1.
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise InvalidRequestError(f"{name} must be >= {low}, got {value}")
        if high is not None and value > high:
            raise InvalidRequestError(f"{name} must be <= {high}, got {value}")
        object.__setattr__(self, name, int(value))

    def _check_float(self, name: str, bound: str, ok: Callable[[float], bool]):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidRequestError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {value}")
        if not ok(value):
            raise InvalidRequestError(f"{name} must be {bound}, got {value}")
        object.__setattr__(self, name, value)

    def _check_stop_token_ids(self):
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)):
            raise InvalidRequestError(f"stop_token_ids must be a list of integers, got {ids!r}")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(ids)}")
        for i, token_id in enumerate(ids):
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise InvalidRequestError(f"stop_token_ids[{i}] must be an integer, got {token_id!r}")
            if token_id < 0:
                raise InvalidRequestError(f"stop_token_ids[{i}] must be >= 0, got {token_id}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
