"""The official `openai` client, unmodified, against `pdserve serve` on the embedded default model
(SmolLM2-135M-Instruct, one prefill and one decode worker on CPU): what `make run` serves."""
from __future__ import annotations

import openai
import pytest

from pdserve.cluster.serve import ServerThread
from pdserve.config import EMBEDDED_MODEL, load_config
from pdserve.engine.tokenizer import load_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    config = load_config(None, device="cpu", router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0})
    with ServerThread(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    # api_key: the client insists on one; the server has none set and ignores it
    return openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list_names_the_model(client):
    assert [m.id for m in client.models.list()] == [EMBEDDED_MODEL]


def test_chat_names_paris(client):
    out = client.chat.completions.create(model=EMBEDDED_MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    (choice,) = out.choices
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_chat_names_paris(client):
    chunks = list(client.chat.completions.create(model=EMBEDDED_MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=24, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None


def test_streamed_completion_usage_matches_the_tokens(server, client):
    prompt = "The capital of France is"
    chunks = list(client.completions.create(
        model=EMBEDDED_MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True, logprobs=0,
        stream_options={"include_usage": True}, extra_body={"return_tokens_as_token_ids": True}))
    *deltas, last = chunks
    tokens = [t for c in deltas for t in c.choices[0].logprobs.tokens]
    assert last.choices == [] and all(c.usage is None for c in deltas)
    prompt_tokens = len(load_tokenizer(server.deployment.model_path).encode_prompt(prompt))
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        prompt_tokens, len(tokens), prompt_tokens + len(tokens))
    assert len(tokens) == 8 or deltas[-1].choices[0].finish_reason == "stop"


def test_generate_url_chat_names_paris(server):
    """The README's second terminal: `pdserve generate --url HOST:PORT --chat ...` over the gRPC API."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--url", server.grpc_address, "--chat",
                          "What is the capital of France?"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
