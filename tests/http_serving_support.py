"""Clients of a real server's HTTP API for the end-to-end tests: completions whose tokens come back as ids
(logprobs with `return_tokens_as_token_ids`: a byte-level model's text alone does not give them back)."""
from __future__ import annotations

import json
import threading
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def greedy_body(prompt, max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True, **extra}


def token_ids(logprobs: dict) -> list[int]:
    """The ids of completions' logprobs tokens, each named `token_id:<id>`."""
    return [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]


def complete(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def events(response: httpx.Response):
    """The JSON payloads of an SSE response, up to `[DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return
        yield json.loads(line.removeprefix("data: "))


class Stream:
    """One streamed completion on its own thread: its token ids, finish reason, and any error event.
    `stop_after` tokens: the client closes the connection there (a client going away mid-stream)."""

    def __init__(self, url: str, body: dict, stop_after: int | None = None):
        self.ids: list[int] = []
        self.finish: str | None = None
        self.error: dict | None = None
        self.first = threading.Event()  # the first token arrived
        self.ended: float | None = None  # monotonic: when the response ended
        self._args = (url, {**body, "stream": True}, stop_after)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self._read(*self._args)
        finally:
            self.ended = time.monotonic()

    def _read(self, url: str, body: dict, stop_after: int | None):
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
            if r.status_code != 200:
                self.error = {"status": r.status_code, "body": r.read().decode()}
                return
            for event in events(r):
                if "error" in event:
                    self.error = event["error"]
                    continue
                (choice,) = event["choices"]
                self.ids += token_ids(choice["logprobs"]) if choice["logprobs"] else []
                self.finish = choice["finish_reason"] or self.finish
                self.first.set()
                if stop_after is not None and len(self.ids) >= stop_after:
                    return  # leaving the block closes the connection

    def join(self, timeout_s: float = 60.0) -> Stream:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "stream did not end in time"
        return self


def metric_samples(url: str) -> dict[tuple[str, tuple], float]:
    """`/metrics` parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}
