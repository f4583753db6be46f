"""Batched sampling: every row of a batch may have its own parameters, one set of tensor ops serves all.

Order of the steps: penalties -> greedy rows take the argmax -> temperature -> top-k -> top-p
-> min-p -> draw. A step that no row of the batch needs is skipped (its tensor is None).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pdserve.engine.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """The sampling parameters of one step's batch as tensors on the logits' device.

    Rows that are greedy carry neutral values (temperature 1, no filters) so the random
    path may run over the whole batch; their tokens come from the argmax instead.
    """

    num_seqs: int  # B
    greedy: torch.Tensor | None  # [B] bool; None when no row is greedy
    all_greedy: bool
    temperature: torch.Tensor | None = None  # [B] float32
    top_k: torch.Tensor | None = None  # [B] int64; vocab_size where disabled
    max_top_k: int = 0  # the largest enabled top_k (known on the host: no sync)
    top_p: torch.Tensor | None = None  # [B] float32
    min_p: torch.Tensor | None = None  # [B] float32
    repetition_penalty: torch.Tensor | None = None  # [B] float32
    seen_mask: torch.Tensor | None = None  # [B, V] bool: in the prompt or the output
    presence_penalty: torch.Tensor | None = None  # [B] float32
    frequency_penalty: torch.Tensor | None = None  # [B] float32
    output_counts: torch.Tensor | None = None  # [B, V] float32
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> its seeded RNG
    num_logprobs: int | None = None  # the most top logprobs any row asked for

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingBatch:
        """`generators[i]` is request i's own RNG (created by its owner from its seed) or None."""
        assert params and len(params) == len(prompt_ids) == len(output_ids) == len(generators)
        greedy = [p.is_greedy for p in params]
        sampled = [p for p in params if not p.is_greedy]

        def column(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        batch = cls(
            num_seqs=len(params),
            greedy=column(greedy, torch.bool) if any(greedy) else None,
            all_greedy=not sampled,
        )
        # Greedy rows get neutral values: whatever the request asked, no filter changes an argmax.
        if sampled:
            if any(p.temperature != 1 for p in sampled):
                batch.temperature = column([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                           torch.float32)
            top_k = [vocab_size if g or not p.top_k else min(p.top_k, vocab_size)
                     for p, g in zip(params, greedy)]
            if any(k < vocab_size for k in top_k):
                batch.top_k = column(top_k, torch.int64)
                batch.max_top_k = max(k for k in top_k if k < vocab_size)
            if any(p.top_p < 1 for p in sampled):
                batch.top_p = column([1.0 if g else p.top_p for p, g in zip(params, greedy)], torch.float32)
            if any(p.min_p > 0 for p in sampled):
                batch.min_p = column([0.0 if g else p.min_p for p, g in zip(params, greedy)], torch.float32)
            batch.generators = {i: gen for i, gen in enumerate(generators) if gen is not None and not greedy[i]}

        # Penalties apply to greedy rows too: they change which token is the argmax.
        use_repetition = any(p.repetition_penalty != 1 for p in params)
        use_openai = any(p.presence_penalty != 0 or p.frequency_penalty != 0 for p in params)
        if use_repetition or use_openai:
            output_counts = _token_counts(output_ids, vocab_size, device)
        if use_repetition:
            batch.repetition_penalty = column([p.repetition_penalty for p in params], torch.float32)
            batch.seen_mask = (_token_counts(prompt_ids, vocab_size, device) + output_counts) > 0
        if use_openai:
            batch.presence_penalty = column([p.presence_penalty for p in params], torch.float32)
            batch.frequency_penalty = column([p.frequency_penalty for p in params], torch.float32)
            batch.output_counts = output_counts

        requested = [p.logprobs for p in params if p.logprobs is not None]
        batch.num_logprobs = max(requested) if requested else None
        return batch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without the host waiting for the device (CUDA: through pinned memory,
    copied in stream order; a plain copy from pageable memory would wait for the step in flight)."""
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _token_counts(histories: list[list[int]], vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """How often each token id occurs in each history: [B, V] float32."""
    max_len = max(len(h) for h in histories)
    # Pad with vocab_size: it lands in a spare last column that is cut off.
    padded = [h + [vocab_size] * (max_len - len(h)) for h in histories]
    ids = to_device(torch.tensor(padded, dtype=torch.int64), device).view(len(histories), max_len)  # [B, L]
    counts = torch.zeros(len(histories), vocab_size + 1, device=device)  # [B, V + 1]
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (HF) then presence/frequency (OpenAI) penalties; returns a new tensor."""
    # logits: [B, V] float32
    if batch.repetition_penalty is not None:
        penalty = batch.repetition_penalty[:, None]  # [B, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(batch.seen_mask, penalized, logits)
    if batch.output_counts is not None:
        counts = batch.output_counts
        logits = logits - batch.presence_penalty[:, None] * (counts > 0) - batch.frequency_penalty[:, None] * counts
    return logits


@dataclass
class Logprobs:
    """Log-probabilities under the raw model logits (see `Sampler`)."""

    token_logprobs: torch.Tensor  # [B] float32: of the chosen token
    top_token_ids: torch.Tensor  # [B, K] int64, most likely first; K = the most any row asked for
    top_logprobs: torch.Tensor  # [B, K] float32


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: Logprobs | None  # None when no row asked for logprobs


class Sampler:
    """Picks one token per row of `logits` [B, V] with each row's own parameters.

    Greedy rows (temperature 0 or top_k 1) take exactly `argmax` of the penalized logits
    (ties: the lowest id). Other rows draw from the filtered distribution by the
    exponential race, `argmax(probs / q)` with `q ~ Exp(1)`: no host sync, and a seeded
    row's noise comes only from its own generator, so its tokens do not depend on the
    other rows of the batch.

    Logprobs are `log_softmax` of the raw model logits, before penalties, temperature
    and filters: what the model believes, independent of how the token was drawn
    (vLLM's default, "raw logprobs").

    The caller's logits are never modified.
    """

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [B, V]; models may emit half precision, softmax and cumsum want float32.
        assert logits.dim() == 2 and logits.shape[0] == batch.num_seqs, (logits.shape, batch.num_seqs)
        raw = logits.float()
        logits = apply_penalties(raw, batch)
        if batch.all_greedy:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = self._sample(logits, batch)
            if batch.greedy is not None:
                token_ids = torch.where(batch.greedy, logits.argmax(dim=-1), token_ids)
        logprobs = None if batch.num_logprobs is None else _logprobs(raw, token_ids, batch.num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.temperature is not None:
            logits = logits / batch.temperature[:, None]
        if batch.top_k is not None:
            logits = _apply_top_k(logits, batch.top_k, batch.max_top_k)
        probs = logits.softmax(dim=-1)  # [B, V]
        if batch.top_p is not None:
            probs = _apply_top_p(probs, batch.top_p)
        if batch.min_p is not None:
            # Unnormalized is fine from here on: the race's argmax does not care about a row's scale.
            threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
            probs = probs.masked_fill(probs < threshold, 0.0)
        q = torch.empty_like(probs).exponential_()  # [B, V]
        for row, generator in batch.generators.items():
            q[row].exponential_(generator=generator)
        # NOTE: a q of exactly 0 would make a masked token 0 / 0 = NaN, which argmax picks.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        return (probs / q).argmax(dim=-1)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    # logits: [B, V]; top_k: [B], vocab_size on rows without top-k.
    vocab_size = logits.shape[-1]
    values = logits.topk(max_top_k, dim=-1).values  # [B, max_top_k], descending
    kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1)[:, None])  # [B, 1]
    kth = kth.masked_fill(top_k[:, None] >= vocab_size, float("-inf"))
    # Ties with the k-th value all stay: which of them to drop would be arbitrary.
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    # probs: [B, V]; keep the smallest set of most likely tokens whose mass reaches top_p.
    sorted_probs, order = probs.sort(dim=-1)  # ascending
    # A token goes when all the tokens at or below it hold no more than 1 - top_p of the mass.
    drop_sorted = sorted_probs.cumsum(dim=-1) <= 1 - top_p[:, None]
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def _logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> Logprobs:
    logprobs = logits.log_softmax(dim=-1)  # [B, V]
    top = logprobs.topk(num_logprobs, dim=-1)
    return Logprobs(
        token_logprobs=logprobs.gather(1, token_ids[:, None]).squeeze(1),
        top_token_ids=top.indices,
        top_logprobs=top.values,
    )
