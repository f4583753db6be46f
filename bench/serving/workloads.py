"""Request sets: what to send (prompt token ids, output length) and, for trace replay, when.

Every builder is seeded: the same seed gives the same requests, whatever server they are sent to.
Prompts are token ids drawn from `[FIRST_ID, vocab_size)` (low ids are often special tokens), so a
request's prompt length is exact on any server that takes token-id prompts; `as_text` turns them into text
of exactly as many tokens for servers that take only text.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIRST_ID = 4  # ids below this are left out of random prompts (BOS / EOS / padding in most vocabularies)
MOONCAKE_BLOCK = 512  # tokens per hash_id in Mooncake's traces

# Published ShareGPT statistics (docs/decisions.md): mean tokens per prompt and per completion.
SHAREGPT_MEAN_INPUT = 161.31
SHAREGPT_MEAN_OUTPUT = 337.99
SHAREGPT_SIGMA = 1.0  # log-space spread of the lognormal fitted to those means (our choice)


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `arrival_s`: its offset in a replayed trace (None: the load generator
    decides when to send it)."""

    prompt_ids: list[int]
    output_len: int
    arrival_s: float | None = None
    prompt_text: str | None = None  # sent instead of the ids where set (`as_text`)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(frozen=True)
class TraceRecord:
    """One line of a Mooncake-format trace: `timestamp` in ms, lengths in tokens, and the ids of the
    prompt's 512-token blocks (equal ids: equal blocks, i.e. a shared prefix)."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(FIRST_ID, vocab_size, size=n).tolist()


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    range_ratio: float = 0.0) -> list[BenchRequest]:
    """Fixed lengths (or uniform within ±range_ratio of them)."""
    rng = np.random.default_rng(seed)
    lo_in, hi_in = _bounds(input_len, range_ratio)
    lo_out, hi_out = _bounds(output_len, range_ratio)
    ins, outs = rng.integers(lo_in, hi_in + 1, size=num), rng.integers(lo_out, hi_out + 1, size=num)
    return [BenchRequest(_ids(rng, int(i), vocab_size), int(o)) for i, o in zip(ins, outs)]


def _bounds(n: int, ratio: float) -> tuple[int, int]:
    return max(1, round(n * (1 - ratio))), max(1, round(n * (1 + ratio)))


def sharegpt_requests(num: int, vocab_size: int, seed: int = 0, max_input: int = 1024,
                      max_total: int = 2048) -> list[BenchRequest]:
    """A synthetic chat mix: input and output lengths lognormal with ShareGPT's published means, clipped
    as vLLM's ShareGPT sampler filters (prompt ≤ 1024, prompt + output ≤ 2048, each ≥ 4)."""
    rng = np.random.default_rng(seed)
    ins = _lognormal(rng, SHAREGPT_MEAN_INPUT, num)
    outs = _lognormal(rng, SHAREGPT_MEAN_OUTPUT, num)
    reqs = []
    for i, o in zip(ins, outs):
        i = int(min(max(i, 4), max_input))
        o = int(min(max(o, 4), max_total - i))
        reqs.append(BenchRequest(_ids(rng, i, vocab_size), o))
    return reqs


def _lognormal(rng: np.random.Generator, mean: float, num: int) -> np.ndarray:
    """Lognormal draws whose mean is `mean` (mu = ln(mean) - sigma²/2)."""
    mu = np.log(mean) - SHAREGPT_SIGMA**2 / 2
    return np.rint(rng.lognormal(mu, SHAREGPT_SIGMA, size=num))


def long_prompt_requests(num: int, vocab_size: int, seed: int = 0, min_input: int = 4096,
                         max_input: int = 16384, output_len: int = 128) -> list[BenchRequest]:
    """Summarisation: long prompts (uniform in [min_input, max_input]), short outputs."""
    rng = np.random.default_rng(seed)
    ins = rng.integers(min_input, max_input + 1, size=num)
    return [BenchRequest(_ids(rng, int(i), vocab_size), output_len) for i in ins]


def shared_prefix_requests(num: int, num_groups: int, prefix_len: int, suffix_len: int, output_len: int,
                           vocab_size: int, seed: int = 0) -> list[BenchRequest]:
    """`num_groups` system prompts of `prefix_len` tokens; request i uses prefix i % num_groups followed
    by its own `suffix_len` tokens."""
    rng = np.random.default_rng(seed)
    prefixes = [_ids(rng, prefix_len, vocab_size) for _ in range(num_groups)]
    return [BenchRequest(prefixes[i % num_groups] + _ids(rng, suffix_len, vocab_size), output_len)
            for i in range(num)]


def load_mooncake_trace(path: str | Path) -> list[TraceRecord]:
    """Parse a Mooncake trace (JSONL: timestamp, input_length, output_length, hash_ids); blank lines are
    skipped, a bad line is a ValueError naming its number."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            records.append(TraceRecord(float(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                                       tuple(int(h) for h in d.get("hash_ids", ()))))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a Mooncake trace record ({e!r})") from None
    return records


def trace_requests(records: list[TraceRecord], vocab_size: int, seed: int = 0,
                   block_tokens: int = MOONCAKE_BLOCK, time_scale: float = 1.0) -> list[BenchRequest]:
    """Requests replaying `records`: arrival offsets from the first timestamp (times `time_scale`);
    each hash id becomes the same `block_tokens` random ids wherever it appears (shared prefixes stay
    shared), the prompt cut or padded with fresh ids to `input_length`."""
    rng = np.random.default_rng(seed)
    blocks: dict[int, list[int]] = {}
    t0 = min((r.timestamp_ms for r in records), default=0.0)
    reqs = []
    for r in records:
        ids: list[int] = []
        for h in r.hash_ids:
            if h not in blocks:
                blocks[h] = _ids(np.random.default_rng([seed, h]), block_tokens, vocab_size)
            ids += blocks[h]
        ids = ids[:r.input_length] + _ids(rng, max(0, r.input_length - len(ids)), vocab_size)
        reqs.append(BenchRequest(ids, max(1, r.output_length), (r.timestamp_ms - t0) / 1000.0 * time_scale))
    return reqs


PLAIN_WORD = re.compile(r" [a-z]{3,12}")


def plain_word_ids(tokenizer) -> list[int]:
    """The ids of the vocabulary's plain words (a space, then 3-12 lower-case letters) that encode back to
    themselves alone: a run of them encodes to the same run, one token per word. `tokenizer`: a
    `tokenizers.Tokenizer`."""
    words = []
    for token_id in sorted(tokenizer.get_vocab().values()):
        text = tokenizer.decode([token_id])
        if PLAIN_WORD.fullmatch(text) and tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
            words.append(token_id)
    if len(words) < 100:
        raise ValueError(f"the tokenizer has {len(words)} plain-word tokens; text prompts need at least 100")
    return words


def as_text(requests: list[BenchRequest], tokenizer) -> list[BenchRequest]:
    """The same requests with text prompts the tokenizer encodes to exactly as many tokens (not counting the
    special tokens a server may add): each id becomes one of the plain-word tokens, equal ids the same word
    (a shared prefix stays shared). `tokenizer`: a `tokenizers.Tokenizer`."""
    words = plain_word_ids(tokenizer)
    out = []
    for r in requests:
        text = tokenizer.decode([words[i % len(words)] for i in r.prompt_ids])
        n = len(tokenizer.encode(text, add_special_tokens=False).ids)
        if n != r.prompt_len:
            raise ValueError(f"a {r.prompt_len}-token prompt became text of {n} tokens")
        out.append(dataclasses.replace(r, prompt_text=text))
    return out
