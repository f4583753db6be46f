"""OpenAI request bodies onto the core's inputs: defaults, n and seeds, the parameter an error names; stream
chunks in the schema's shapes."""
from __future__ import annotations

import json

import pytest

from pdserve.router.frontend import GenerateDelta, Usage
from pdserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ParamError,
    chat_inputs,
    completion_inputs,
)
from pdserve.router.openai_serving import ChatFormat, CompletionFormat


def test_n_gets_distinct_ids_and_consecutive_seeds():
    inputs = completion_inputs(CompletionRequest(prompt="hi", n=3, seed=41), "cmpl-x")
    assert [i.request_id for i in inputs] == ["cmpl-x-0", "cmpl-x-1", "cmpl-x-2"]
    assert [i.params.seed for i in inputs] == [41, 42, 43]
    unseeded = completion_inputs(CompletionRequest(prompt="hi", n=2), "cmpl-y")
    assert [i.params.seed for i in unseeded] == [None, None]


def test_defaults_and_single_prompt():
    (single,) = completion_inputs(CompletionRequest(prompt=[[3, 4]]), "c")
    assert single.token_ids == (3, 4) and single.params.max_tokens == 16 and single.params.temperature == 1.0
    (listed,) = completion_inputs(CompletionRequest(prompt=["text"], stop="\n"), "c")
    assert listed.text == "text" and listed.stop == ("\n",)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}])
    (chat,) = chat_inputs(req, "c", default_max_tokens=100)
    assert chat.messages[0].content == "ab" and chat.params.max_tokens == 100 and chat.params.logprobs is None


@pytest.mark.parametrize("fields,param", [
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
])
def test_errors_name_the_parameter_as_sent(fields, param):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **fields)
    with pytest.raises(ParamError) as info:
        chat_inputs(req, "c", default_max_tokens=10)
    assert info.value.param == param and info.value.message.startswith(param)


class _Core:
    def token_text(self, token_id: int) -> str:
        return chr(97 + token_id)


@pytest.mark.parametrize("fmt_type", [ChatFormat, CompletionFormat])
@pytest.mark.parametrize("logprobs", [False, True])
def test_stream_chunks_are_the_chunk_types_dumps(fmt_type, logprobs):
    """Chunks are written as plain dicts: each is what its pydantic chunk type dumps, key order included."""
    fmt = fmt_type(_Core(), "id-1", "m", n=2, logprobs=logprobs)
    entries = [{"token_logprob": -0.5, "top": {1: -0.5, 2: -1.5}}, {"token_logprob": -0.25, "top": {0: -0.25}}]
    deltas = [(1, GenerateDelta("ab", [0, 1], logprobs=entries)), (0, GenerateDelta("é", [2], logprobs=entries[:1])),
              (1, GenerateDelta("", [3], "length", Usage(4, 3), entries[1:]))]
    for index, delta in deltas:
        chunk = fmt.add(index, delta, stream=True)
        assert list(chunk) == list(fmt.chunk_type.model_fields)
        assert json.dumps(chunk) == json.dumps(fmt.chunk_type.model_validate(chunk).model_dump())
