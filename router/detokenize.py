"""Incremental detokenization of one request's output, with stop strings.

Text comes from the `tokenizers` library's streaming decoder (`DecodeStream`, special tokens
skipped): it returns nothing while a character is still incomplete (a multi-byte character split
across byte-level or byte-fallback tokens) and the new text once it is whole. The text of the
output is that of prompt + output minus that of the prompt (as vLLM's): a few prompt ids are given
to the decoder as context, so a first token's leading space survives a SentencePiece decoder.

Stop strings follow OpenAI's semantics: the streamed text never includes a stop string, and
generation ends at the first one. Only as many trailing characters as could still start a stop
string are held back; they are released as soon as they cannot.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pdserve.errors import InvalidRequestError

# Prompt ids the decoder sees as context: enough for a leading space or a character split across
# the prompt's end, few enough that the first step does not decode the whole prompt.
PROMPT_CONTEXT_IDS = 5


def check_stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    """The stop strings as a tuple; an empty one is an error naming its index."""
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop[{i}] must be a non-empty string, got {s!r}")
    return tuple(stop)


class Detokenizer:
    """Turns one request's output ids into text, chunk by chunk, and watches for stop strings.

    `tokenizer` is the model's `tokenizers.Tokenizer` (an HF tokenizer's `.backend_tokenizer`).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = check_stop_strings(stop)
        self.stopped = False
        self.num_tokens = 0  # output ids consumed; once stopped, up to the one that completed the stop string
        context = _clean_context(tokenizer, [int(t) for t in prompt_ids[-PROMPT_CONTEXT_IDS:]])
        self._stream = DecodeStream(ids=context, skip_special_tokens=True)
        self._ids = context  # context + output ids, to decode what the stream still holds at the end
        self._num_decoded = len(context)  # ids whose text the stream has already returned
        self._held = ""  # decoded text not yet released: it may be the start of a stop string
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    def add(self, token_ids: Iterable[int]) -> tuple[str, bool]:
        """Feed new output ids; return (text released by them, whether a stop string was reached).

        Ids after the one that completes a stop string are ignored (`num_tokens` stops counting).
        """
        released = []
        for token_id in token_ids:
            if self.stopped:
                break
            self.num_tokens += 1
            token_id = int(token_id)
            self._ids.append(token_id)
            chunk = self._stream.step(self.tokenizer, token_id)
            if chunk is None:
                continue
            self._num_decoded = len(self._ids)
            released.append(self._release(chunk))
        return "".join(released), self.stopped

    def flush(self) -> str:
        """At the end of generation: release everything held, an incomplete character included
        (as `decode` renders it, U+FFFD), unless it reaches a stop string."""
        if self.stopped:
            return ""
        tail = self._decode_pending()
        self._num_decoded = len(self._ids)
        text = self._release(tail)
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _release(self, chunk: str) -> str:
        """Append `chunk` to the held text; return what can be released, stopping at a stop string."""
        held = self._held + chunk
        if not self.stop:
            self._held = ""
            return held
        cut = _first_stop(held, self.stop)
        if cut is not None:
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = _stop_prefix_len(held, self.stop, self._max_stop_len)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def _decode_pending(self) -> str:
        """The text of the ids the stream is still waiting on, in the context of the ones before."""
        if self._num_decoded == len(self._ids):
            return ""
        prefix = self._ids[max(0, self._num_decoded - PROMPT_CONTEXT_IDS):self._num_decoded]
        before = self.tokenizer.decode(prefix, skip_special_tokens=True)
        after = self.tokenizer.decode(prefix + self._ids[self._num_decoded:], skip_special_tokens=True)
        if after.startswith(before):
            return after[len(before):]
        return self.tokenizer.decode(self._ids[self._num_decoded:], skip_special_tokens=True)


def _clean_context(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """The longest tail of `ids` whose text does not end in an incomplete character.

    NOTE: the streaming decoder takes its context's text as the prefix of everything after it; a
    context that ends in U+FFFD (a window starting inside a byte-fallback character, which such a
    decoder renders as a whole run of U+FFFD, or a prompt cut inside a character) is no such prefix,
    and the decoder would stream the context's text again as output.
    """
    for start in range(len(ids)):
        if not tokenizer.decode(ids[start:], skip_special_tokens=True).endswith("\ufffd"):
            return ids[start:]
    return []


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _stop_prefix_len(text: str, stop: tuple[str, ...], max_stop_len: int) -> int:
    """The length of the longest suffix of `text` that begins some stop string (and is shorter than it)."""
    for k in range(min(len(text), max_stop_len - 1), 0, -1):
        suffix = text[-k:]
        if any(s.startswith(suffix) for s in stop):
            return k
    return 0
