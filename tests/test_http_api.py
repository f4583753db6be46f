"""The OpenAI-compatible HTTP API through the official `openai` client, over a scripted core."""
from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from http_support import API_KEY, MAX_REQUEST_BYTES, MODEL, FakeCore, ServerThread

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    srv = ServerThread(FakeCore(), api_key=API_KEY, max_request_bytes=MAX_REQUEST_BYTES, default_max_tokens=512)
    yield srv
    srv.stop()


@pytest.fixture
def core(server):
    server.core.__init__()  # a fresh script and record for each test
    return server.core


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=10)


def test_chat_completion(client, core):
    out = client.chat.completions.create(model=MODEL, messages=CHAT)
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and choice.index == 0
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (7, 3, 10)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (request,) = core.requests
    assert request.messages[0].role == "user" and request.messages[0].content == CHAT[0]["content"]
    assert request.params.max_tokens == 512  # the server's default for chat


def test_chat_stream_with_usage(client, core):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris (seed None)."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_completion_token_ids_and_stream_usage(client, core):
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3)
    assert out.choices[0].text.endswith("Paris (seed None).") and out.usage.prompt_tokens == 4
    chunks = list(client.completions.create(model=MODEL, prompt="Paris is", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.completion_tokens == 3
    ids, text = core.requests[0], core.requests[1]
    assert ids.token_ids == (5, 6, 7, 8) and ids.text is None and ids.params.max_tokens == 3
    assert text.text == "Paris is" and text.params.max_tokens == 16  # OpenAI's completions default


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


@pytest.mark.parametrize("stream", [False, True])
def test_n_fans_out_with_seeds(client, core, stream):
    def texts():
        out = client.completions.create(model=MODEL, prompt="x", n=2, seed=7, stream=stream)
        by_index = {}
        for c in (out if stream else [out]):
            for choice in c.choices:
                by_index[choice.index] = by_index.get(choice.index, "") + choice.text
        return by_index

    first = texts()
    assert first[0].endswith("(seed 7).") and first[1].endswith("(seed 8).")
    assert texts() == first
    ids = [r.request_id for r in core.requests]
    assert len(set(ids)) == 4 and ids[0].endswith("-0") and ids[1].endswith("-1")


def test_sampling_fields_reach_the_core(client, core):
    client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=50, max_completion_tokens=9, temperature=0.5, top_p=0.9, seed=3,
        presence_penalty=0.5, frequency_penalty=-0.5, stop=["\n", "END"], user="ignored",
        extra_body={"top_k": 4, "min_p": 0.1, "repetition_penalty": 1.2, "stop_token_ids": [5], "ignore_eos": True})
    (request,) = core.requests
    p = request.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.top_k, p.min_p) == (9, 0.5, 0.9, 3, 4, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)
    assert p.stop_token_ids == (5,) and p.ignore_eos and p.logprobs is None and request.stop == ("\n", "END")


def test_chat_logprobs(client, core):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [t.token for t in content] == ["<10>", "<11>", "<12>"] and content[1].logprob == -1.5
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("<10>", -0.5), ("<99>", -3.0)]
    assert content[0].bytes == list(b"<10>") and core.requests[0].params.logprobs == 2
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, stream=True))
    assert [t.token for c in chunks for t in c.choices[0].logprobs.content] == ["<10>", "<11>", "<12>"]


def test_completion_logprobs(client, core):
    out = client.completions.create(model=MODEL, prompt="x", logprobs=1)
    lp = out.choices[0].logprobs
    assert lp.tokens == ["<10>", "<11>", "<12>"] and lp.token_logprobs == [-0.5, -1.5, -2.5]
    assert lp.top_logprobs[2] == {"<12>": -2.5, "<99>": -3.0} and lp.text_offset == [0, 4, 8]
    assert core.requests[0].params.logprobs == 1


def test_logprobs_name_tokens_by_id(client, core):
    # vLLM's return_tokens_as_token_ids: exact ids where one token's text is not (half a character)
    lp = client.completions.create(model=MODEL, prompt="x", logprobs=1,
                                   extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert lp.tokens == ["token_id:10", "token_id:11", "token_id:12"] and lp.text_offset == [0, 4, 8]
    assert lp.top_logprobs[2] == {"token_id:12": -2.5, "token_id:99": -3.0}
    out = client.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=1,
                                         extra_body={"return_tokens_as_token_ids": True})
    first = out.choices[0].logprobs.content[0]
    assert (first.token, first.bytes, first.top_logprobs[1].token) == ("token_id:10", list(b"<10>"), "token_id:99")


def test_health_status_metrics(server, core):
    assert httpx.get(server.url + "/health").status_code == 200
    core.serving = False
    assert httpx.get(server.url + "/health").status_code == 503
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(server.url + "/v1/status", headers=headers).json() == core.status()
    assert httpx.get(server.url + "/v1/status").status_code == 401
    server.metrics.first_token(0.05)
    before = _sample(server, "pdserve_request_errors_total", kind="model_not_found")
    httpx.post(server.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers)
    assert _sample(server, "pdserve_request_errors_total", kind="model_not_found") == before + 1
    assert _sample(server, "pdserve_time_to_first_token_seconds_count") >= 1


def _sample(server, name: str, **labels) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0
