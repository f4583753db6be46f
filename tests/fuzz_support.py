"""Seeded generators of malformed requests for the fuzz tests: each case says what a correct server answers.

HTTP cases are raw bytes with a method, route and headers; gRPC cases are hand-built `GenerateRequest`s or raw
bytes sent where a serialized one belongs. A case's `expect` is the set of statuses (HTTP codes, gRPC status
names) a correct answer may have: every case is a client's mistake, so none of them holds a 5xx or INTERNAL.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.api import pdserve_pb2 as pb

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json", **AUTH}


@dataclass(frozen=True)
class HttpCase:
    kind: str
    method: str
    path: str
    content: bytes
    expect: frozenset[int]
    words: str  # what the error's message must say
    headers: dict = field(default_factory=lambda: dict(JSON))


def valid_body(rng: random.Random, path: str) -> dict:
    """A small well-formed request for `path` (the fuzz breaks it)."""
    body = {"max_tokens": rng.randint(1, 4), "temperature": 0.0, "stream": rng.random() < 0.3}
    if path == CHAT:
        return {**body, "messages": [{"role": "user", "content": "hi"}]}
    return {**body, "prompt": rng.choice(["hello", [5, 6, 7]])}


def _dump(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


def _broken_json(rng, path):
    text = _dump(valid_body(rng, path))
    cut = text[: rng.randrange(len(text))]  # no proper prefix of an object is JSON
    return HttpCase("broken json", "POST", path, cut + rng.choice([b"", b"\x00", b"'", b",,", b"}}"]), frozenset({400}),
                    "not valid JSON")


WRONG_TYPES = {
    "max_tokens": ["5", 5.5, True, [], {}], "temperature": ["hot", True, [1.0], {}], "n": ["2", 2.0, False],
    "stream": ["yes", 1, None], "stop": [5, [1], {"a": "b"}], "seed": ["7", 7.5], "top_p": ["1", []],
    "logprobs": ["2", 1.5], "stop_token_ids": [5, ["x"], [1.5]], "stream_options": ["x", {"include_usage": "y"}],
    "logit_bias": [5, {"1": "x"}], "ignore_eos": ["true", 1], "model": [5, ["m"]], "top_k": ["1", 1.5],
}
COMPLETION_TYPES = {"prompt": [5, {}, [1.5], [[]], [True], [["a"]], [[1, "a"]], "", None, ["a", "b"]],
                    "echo": [True], "suffix": ["x"], "best_of": [3]}
CHAT_TYPES = {"messages": ["hi", [1], [], [{"role": 5}], [{"content": "x"}], [{"role": "user", "content": 5}],
                          [{"role": "user", "content": [{"type": "image", "text": "x"}]}],
                          [{"role": "wizard", "content": "x"}]],
              "logprobs": [1, "true"], "top_logprobs": [3, "3"], "max_completion_tokens": ["3", 0]}


def _wrong_type(rng, path):
    table = {**WRONG_TYPES, **(CHAT_TYPES if path == CHAT else COMPLETION_TYPES)}
    name = rng.choice(sorted(table))
    return HttpCase("wrong type", "POST", path, _dump({**valid_body(rng, path), name: rng.choice(table[name])}),
                    frozenset({400}), name)


BAD_NUMBERS = {
    "max_tokens": [0, -1, 10**6, 2**63, -(2**63), 10**40], "temperature": [-1.0, -1e308, 1e400, -1e-300],
    "top_p": [0, -0.5, 1.0001, 1e308], "n": [0, -3, 129, 10**12], "seed": [2**63, -(2**63) - 1, 10**40],
    "logprobs": [-1, 21, 2**40], "top_k": [-1, -(2**40)], "min_p": [-0.1, 1.5], "presence_penalty": [2.5, -1e9],
    "frequency_penalty": [-2.01, 1e20], "repetition_penalty": [0, -1.0], "stop_token_ids": [[-1], [-(2**70)]],
}


def _bad_number(rng, path):
    name = rng.choice(sorted(BAD_NUMBERS))
    body = {**valid_body(rng, path), name: rng.choice(BAD_NUMBERS[name])}
    words = name
    if name == "logprobs" and path == CHAT:
        body = {**body, "logprobs": True, "top_logprobs": body["logprobs"]}
    if path == COMPLETIONS and rng.random() < 0.3:  # or the prompt's ids
        body = {**valid_body(rng, path), "prompt": [5, rng.choice([-1, 256, 2**31, 2**64, 10**30])]}
        words = "vocabulary"
    return HttpCase("huge or negative number", "POST", path, _dump(body), frozenset({400}), words)


def _nan(rng, path):
    name = rng.choice(["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                       "repetition_penalty"])
    literal = rng.choice([b"NaN", b"Infinity", b"-Infinity"])
    text = _dump({**valid_body(rng, path), name: 0.5}).replace(b"0.5", literal, 1)
    return HttpCase("NaN or Infinity", "POST", path, text, frozenset({400}), f"{name} must be a finite number")


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf0\x28\x8c\x28", b"\x80", b"\xe2\x82"]
SURROGATES = [b"\\ud800", b"\\udfff", b"\\ud83d x", b"\\ud83d\\u0041"]


def _bad_text(rng, path):
    """Invalid UTF-8 bytes, or a JSON escape of a lone surrogate (valid JSON syntax, not valid Unicode)."""
    bad = rng.choice(INVALID_UTF8 + SURROGATES)
    marker = b"MARK"
    body = valid_body(rng, path)
    key = rng.choice(["model", "stop"] + (["messages"] if path == CHAT else ["prompt"]))
    if key == "messages":
        body["messages"] = [{"role": "user", "content": "MARK"}]
    else:
        body[key] = "MARK"
    return HttpCase("invalid UTF-8", "POST", path, _dump(body).replace(marker, b"a" + bad), frozenset({400}),
                    "not valid JSON")


def _oversized(rng, path, limit):
    body = _dump({**valid_body(rng, path), "stop": ["x" * rng.randint(limit, 2 * limit)]})
    return HttpCase("oversized body", "POST", path, body, frozenset({413}), "over the limit")


def _wrong_content_type(rng, path):
    content, ctype = rng.choice([
        (b"prompt=hello&max_tokens=3", "application/x-www-form-urlencoded"),
        (b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--b--\r\n",
         "multipart/form-data; boundary=b"),
        (b"<prompt>hello</prompt>", "application/xml"),
        (b"hello", "text/plain"),
        (bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))), "application/octet-stream"),
    ])
    return HttpCase("wrong content type", "POST", path, content, frozenset({400}), "not valid JSON",
                    {"Content-Type": ctype, **AUTH})


def _nested(rng, path):
    depth = rng.choice([1000, 5000, 20000])  # past the JSON parser's nesting limit
    key = rng.choice(["prompt", "stop", "extra"])
    text = _dump({**valid_body(rng, path), key: "MARK"}).replace(b'"MARK"', b"[" * depth + b"]" * depth)
    return HttpCase("deeply nested", "POST", path, text, frozenset({400}), "recursion limit")


def _missing_and_unknown(rng, path):
    body = valid_body(rng, path)
    body.pop("messages" if path == CHAT else "prompt")
    for _ in range(rng.randint(1, 5)):
        body[f"unknown_{rng.randrange(10**6)}"] = rng.choice([1, "x", None, [1], {"a": {}}])
    shape = rng.randrange(5)
    if shape == 0:
        return HttpCase("missing field", "POST", path, _dump(body), frozenset({400}), "is required")
    return HttpCase("not an object", "POST", path, _dump([[body], "body", 5, None][shape - 1]), frozenset({400}),
                    "must be a JSON object")


def _wrong_route(rng, path):
    if rng.random() < 0.5:
        return HttpCase("wrong method", rng.choice(["GET", "PUT", "DELETE", "PATCH"]), path,
                        _dump(valid_body(rng, path)), frozenset({405}), "Method Not Allowed")
    route = rng.choice(["/v1/complete", "/v2/completions", "/v1/chat", "/%ff", "/v1/",
                        "/v1/completions/extra", "/" + "a" * 2000])
    return HttpCase("wrong route", rng.choice(["GET", "POST"]), route, b"{}", frozenset({404}), "Not Found")


def _no_key(rng, path):
    headers = rng.choice([{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"},
                          {"Authorization": ""}])
    return HttpCase("missing or wrong API key", "POST", path, _dump(valid_body(rng, path)), frozenset({401}),
                    "API key", {"Content-Type": "application/json", **headers})


HTTP_KINDS: list[Callable] = [_broken_json, _wrong_type, _bad_number, _nan, _bad_text, _wrong_content_type,
                              _nested, _missing_and_unknown, _wrong_route, _no_key]


def http_cases(seed: int, n: int, max_request_bytes: int) -> list[HttpCase]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        path = rng.choice([COMPLETIONS, CHAT])
        if i % 25 == 0:
            cases.append(_oversized(rng, path, max_request_bytes))
        else:
            cases.append(HTTP_KINDS[i % len(HTTP_KINDS)](rng, path))
    return cases


# --- gRPC --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GrpcCase:
    kind: str
    payload: pb.GenerateRequest | bytes
    expect: frozenset[str]
    words: str  # what the status's details must say
    metadata_ok: bool = True


INVALID = frozenset({"INVALID_ARGUMENT"})
BAD_SAMPLING = {
    "temperature": [float("nan"), float("inf"), -1.0, -float("inf")], "top_p": [0.0, 1.5, float("nan")],
    "min_p": [-0.1, 2.0, float("nan")], "presence_penalty": [3.0, float("-inf")],
    "frequency_penalty": [-3.0, float("nan")], "repetition_penalty": [0.0, -1.0, float("nan")],
    "logprobs": [21, 2**32 - 1], "max_tokens": [0, 2**32 - 1, 10**6],
}


def _grpc_valid(rng) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=rng.randint(1, 4), temperature=0.0))
    request.token_ids.ids.extend([5, 6, 7])
    return request


def _grpc_prompt(rng):
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=2))
    choice = rng.randrange(7)
    words = ["prompt", "text", "token_ids", "messages", "role", "vocabulary", "max_prompt_tokens"][choice]
    if choice == 1:  # choice 0: no prompt at all, the oneof is empty
        request.text = ""
    elif choice == 2:
        request.token_ids.SetInParent()
    elif choice == 3:
        request.messages.SetInParent()
    elif choice == 4:
        request.messages.messages.add(role=rng.choice(["", "wizard", "USER", "user\x00"]), content="hi")
    elif choice == 5:
        request.token_ids.ids.extend([5, rng.choice([256, 1000, 2**31, 2**32 - 1])])
    elif choice == 6:
        request.token_ids.ids.extend([5] * rng.choice([600, 5000]))
    return GrpcCase("bad prompt", request, INVALID, words)


def _grpc_sampling(rng):
    request = _grpc_valid(rng)
    name = rng.choice(sorted(BAD_SAMPLING))
    setattr(request.sampling, name, rng.choice(BAD_SAMPLING[name]))
    return GrpcCase("out-of-range field", request, INVALID, name)


def _grpc_huge(rng):
    request = _grpc_valid(rng)
    choice = rng.randrange(4)
    if choice == 0:  # 10**6 ids: 1 byte each on the wire (5) or 2 (300)
        del request.token_ids.ids[:]
        request.token_ids.ids.extend([rng.choice([5, 300])] * 10**6)
        return GrpcCase("huge repeated field", request, INVALID, "max_prompt_tokens")
    if choice == 1:
        request.sampling.stop.extend(["ab"] * rng.choice([100, 10**4, 10**5]))
        return GrpcCase("huge repeated field", request, INVALID, "at most 64 stop strings")
    if choice == 2:
        request.sampling.stop_token_ids.extend([7] * rng.choice([2000, 10**5]))
        return GrpcCase("huge repeated field", request, INVALID, "stop_token_ids: at most")
    request.sampling.stop.extend(["x" * (1 << 20)])
    return GrpcCase("huge repeated field", request, INVALID, "")


def _grpc_raw(rng):
    """Bytes that are not a GenerateRequest: truncated, garbage, invalid UTF-8 in a string."""
    good = _grpc_valid(rng)
    good.text = "hello"
    data = good.SerializeToString()
    choice = rng.randrange(4)
    if choice == 0:  # a text field whose length runs past the end
        raw = data + b"\x12\x7f" + data[: rng.randrange(len(data))]
    elif choice == 1:
        bad = rng.choice(INVALID_UTF8)
        raw = b"\x12" + bytes([len(bad)]) + bad  # field 2 (text): invalid UTF-8
    elif choice == 2:
        raw = b"\x0a\x03a" + rng.choice([b"\xff\xfe", b"\xc3\x28"])  # field 1 (request_id): invalid UTF-8
    else:
        raw = rng.choice([b"\x12", b"\xff" * 8, b"\x1a\x05\x0a\x03\x80\x80\x80\x80", bytes(rng.randrange(256)
                                                                                     for _ in range(40)) + b"\x12"])
    return GrpcCase("malformed bytes", raw, INVALID, "malformed pdserve.v1.GenerateRequest")


def _grpc_no_key(rng):
    return GrpcCase("missing API key", _grpc_valid(rng), frozenset({"UNAUTHENTICATED"}), "API key", metadata_ok=False)


GRPC_KINDS = [_grpc_prompt, _grpc_sampling, _grpc_huge, _grpc_raw, _grpc_no_key]


def grpc_cases(seed: int, n: int, max_request_bytes: int) -> list[GrpcCase]:
    """`n` cases; one larger than `max_request_bytes` on the wire expects RESOURCE_EXHAUSTED instead."""
    rng = random.Random(seed)
    cases = [rng.choices(GRPC_KINDS, [3, 3, 1, 3, 1])[0](rng) for _ in range(n)]
    return [_sized(c, max_request_bytes) for c in cases]


def _sized(case: GrpcCase, limit: int) -> GrpcCase:
    size = len(case.payload) if isinstance(case.payload, bytes) else case.payload.ByteSize()
    if size <= limit or not case.metadata_ok:
        return case
    return GrpcCase(case.kind, case.payload, frozenset({"RESOURCE_EXHAUSTED"}), "larger than max")
