"""Incremental detokenization (router/detokenize.py): text equal to a whole decode, stop strings."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers

from pdserve.errors import InvalidRequestError
from pdserve.router.detokenize import Detokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Hello 世界! 👋🏽 naïve café — \"quoted\" , spaced . 日本語のテキスト",
    "👨‍👩‍👧‍👦 family, 🇫🇷 flag, 한국어, Ελληνικά, emoji at the end 🎉",
]


def llama_style_tokenizer() -> Tokenizer:
    """A SentencePiece-like BPE: "▁" for spaces, byte fallback for anything not in the vocab
    (so every CJK character or emoji is split into byte tokens), a leading space stripped on decode."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    chars = ["▁", *"abcdefghijklmnopqrstuvwxyzTHPFW,.!?'\"-"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "c"), ("▁c", "a"), ("▁", "P"), ("a", "r"),
              ("▁P", "ar"), ("i", "s"), ("▁Par", "is")]
    merged = ["".join(m) for m in merges]
    vocab = {tok: i for i, tok in enumerate(specials + byte_tokens + chars + merged)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens(specials)
    return tok


class Case:
    """A tokenizer under test: its `tokenizers.Tokenizer`, the reference decode, an EOS id."""

    def __init__(self, backend: Tokenizer, decode, eos: int):
        self.backend, self.decode, self.eos = backend, decode, eos

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module", params=["smollm2", "llama-style"])
def case(request) -> Case:
    if request.param == "llama-style":
        tok = llama_style_tokenizer()
        return Case(tok, lambda ids: tok.decode(ids, skip_special_tokens=True), eos=2)
    from pdserve.engine.tokenizer import load_tokenizer

    hf = load_tokenizer(Path(request.getfixturevalue("embedded_dir"))).hf
    return Case(hf.backend_tokenizer, lambda ids: hf.decode(ids, skip_special_tokens=True), eos=hf.eos_token_id)


def stream(det: Detokenizer, ids: list[int], batch_sizes: list[int] | None = None) -> list[str]:
    """Feed `ids` in batches (one by one by default); return every released chunk, the flush last."""
    chunks, i = [], 0
    for n in batch_sizes or [1] * len(ids):
        text, _ = det.add(ids[i:i + n])
        chunks.append(text)
        i += n
    return [*chunks, det.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_one_by_one_equals_whole_decode(case, text):
    ids = case.encode(text) + [case.eos] + case.encode(" and more")
    det = Detokenizer(case.backend)
    chunks = stream(det, ids)
    assert "".join(chunks) == case.decode(ids)
    assert det.num_tokens == len(ids) and not det.stopped
    # a character split over byte tokens comes out whole, at once: no chunk holds part of one
    assert all("\ufffd" not in c for c in chunks)


def test_random_batches_equal_whole_decode(case):
    rng = random.Random(0)
    ids = case.encode(" ".join(TEXTS))
    for _ in range(5):
        sizes, left = [], len(ids)
        while left:
            sizes.append(min(left, rng.randint(1, 4)))
            left -= sizes[-1]
        assert "".join(stream(Detokenizer(case.backend), ids, sizes)) == case.decode(ids)


def test_incomplete_character_at_the_end_is_flushed_as_replacement_characters(case):
    ids = case.encode("ok 👋🏽")[:-1]  # the last byte token of the skin-tone modifier cut off
    det = Detokenizer(case.backend)
    streamed, _ = det.add(ids)
    assert streamed == "ok 👋"
    tail = det.flush()
    # as `decode` renders the incomplete tail (a byte-fallback decoder renders its whole run of
    # byte tokens so, but what was streamed already stays streamed)
    assert tail and set(tail) == {"\ufffd"}
    assert case.decode(ids).endswith(tail)


def test_prompt_context_keeps_the_leading_space(case):
    prompt = case.encode("What is the capital?")
    ids = case.encode("What is the capital? the capital is Paris 世界")
    assert ids[:len(prompt)] == prompt
    out = ids[len(prompt):]
    text = "".join(stream(Detokenizer(case.backend, prompt_ids=prompt), out))
    assert text == case.decode(ids)[len(case.decode(prompt)):] == " the capital is Paris 世界"


def test_prompt_context_at_every_cut(case):
    """Prompt and output split at every token: on a character boundary the output's text is that of the
    whole minus the prompt's (a context window that starts inside a character included); a prompt cut
    inside a character has no context, so its text is not streamed again."""
    ids = case.encode("hi 世界 👋🏽 ok 日本語")
    for cut in range(1, len(ids)):
        prompt_text = case.decode(ids[:cut])
        text = "".join(stream(Detokenizer(case.backend, prompt_ids=ids[:cut]), ids[cut:]))
        if prompt_text.endswith("\ufffd"):
            assert text == case.decode(ids[cut:]), cut
        else:
            assert text == case.decode(ids)[len(prompt_text):], cut


def test_stop_string_is_never_streamed(case):
    ids = case.encode("The capital of France is Paris. It is")
    det = Detokenizer(case.backend, stop=["Paris", "It"])
    chunks = stream(det, ids)
    assert "".join(chunks) == "The capital of France is "
    assert det.stopped
    # counted up to the token that completed the stop string, not past it
    assert case.decode(ids[:det.num_tokens]).endswith("Paris")
    assert not case.decode(ids[:det.num_tokens - 1]).endswith("Paris")
    assert det.add(case.encode(" more")) == ("", True)


def test_earliest_stop_string_wins(case):
    det = Detokenizer(case.backend, stop=["is", "capital"])
    assert "".join(stream(det, case.encode("the capital is Paris"))) == "the "


def test_holds_back_only_what_could_start_a_stop_string():
    tok = llama_style_tokenizer()
    ids = tok.encode("the cap cat! more", add_special_tokens=False)
    assert ids.tokens[:6] == ["▁the", "▁ca", "p", "▁ca", "t", "!"]
    det = Detokenizer(tok, stop=["cat!"])
    # of " ca" only "ca" could begin "cat!": held, until "p" rules it out; the second "ca" and "t" are
    # held until "!" completes the stop string, and then dropped
    assert [det.add([i]) for i in ids.ids[:6]] == [
        ("the", False), (" ", False), ("cap", False), (" ", False), ("", False), ("", True),
    ]
    assert det.num_tokens == 6
    assert det.flush() == ""


def test_stop_string_across_a_multi_byte_character(case):
    ids = case.encode("Hello 世界! bye")
    det = Detokenizer(case.backend, stop=["界!"])
    assert "".join(stream(det, ids)) == "Hello 世"
    assert det.stopped


def test_held_text_is_released_at_the_end(case):
    det = Detokenizer(case.backend, stop=["Paris!"])
    text, stopped = det.add(case.encode("the capital is Pari"))
    assert not stopped and text == "the capital is "
    assert det.flush() == "Pari"


def test_random_stops_match_truncated_decode(case):
    rng = random.Random(1)
    for text in TEXTS:
        ids = case.encode(text)
        full = case.decode(ids)
        for _ in range(4):
            start = rng.randrange(len(full) - 3)
            stop = full[start:start + rng.randint(1, 3)]
            if "\ufffd" in stop:
                continue
            assert "".join(stream(Detokenizer(case.backend, stop=[stop]), ids)) == full[:full.find(stop)]


def test_empty_stop_string_is_rejected_naming_it():
    with pytest.raises(InvalidRequestError, match=r"stop\[1\]"):
        Detokenizer(llama_style_tokenizer(), stop=["ok", ""])
