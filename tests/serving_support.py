"""Shared pieces of the serving tests: a tiny model with a real tokenizer, a server on loopback, clients."""
from __future__ import annotations

import threading
import time

import grpc
import ray

from pdserve.api.pdserve_pb2_grpc import GenerationStub
from pdserve.config import load_config
from pdserve.router.client import RemoteError, build_request, stream_generate

GREEDY = {"temperature": 0.0, "ignore_eos": True}
TEXTS = ["Hello there, how", "The quick brown fox jumps over the lazy dog and keeps on running far",
         "a", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31"]
MAX_TOKENS = 12


def tiny_model(folder) -> str:
    from conftest import add_byte_tokenizer, make_tiny_checkpoint

    path = make_tiny_checkpoint(folder, "llama-gqa-untied")
    add_byte_tokenizer(path)
    return path


def tiny_config(model: str, **overrides):
    """A CPU deployment of the tiny model: small budgets so prompts are chunked and pools are small. A
    `kv_transfer` override is merged into the base's section."""
    base = dict(model=model, device="cpu", dtype="float32", max_num_batched_tokens=32, max_num_seqs=16,
                num_kv_blocks=128, block_size=16, kv_transfer={"timeout_s": 10.0}, rank_timeout_s=30.0,
                router={"host": "127.0.0.1", "grpc_port": 0, "http_port": 0})
    overrides["kv_transfer"] = {**base["kv_transfer"], **overrides.get("kv_transfer", {})}
    return load_config(None, **{**base, **overrides})


def collect(url: str, **kwargs) -> tuple[list[int], str, object]:
    """(token ids, finish reason, usage) of one streamed Generate."""
    ids, last = [], None
    for last in stream_generate(url, **kwargs):
        ids += list(last.token_ids)
    return ids, last.finish_reason, last.usage


def pools_full(server, timeout_s: float = 15.0) -> list[tuple[str, int, int]]:
    """Wait (bounded) until every worker's block pool is full; returns the (worker, free, total) of any that
    are not."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = ray.get([w.actor.load_now.remote() for w in server.router.workers if w.healthy], timeout=10)
        names = [w.name for w in server.router.workers if w.healthy]
        short = [(n, x.free_blocks, x.total_blocks) for n, x in zip(names, loads) if x.free_blocks != x.total_blocks]
        if not short or time.monotonic() > deadline:
            return short
        time.sleep(0.1)


def wait_for_state(server, request_id: str, states: set, timeout_s: float = 20.0) -> str | None:
    """The request's router state once it is one of `states` (names), or None past the bound."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stream = server.router.streams.get(request_id)
        if stream is not None and stream.state.value in states:
            return stream.state.value
        time.sleep(0.002)
    return None


class Background:
    """One streamed request on its own thread; `cancel()` cancels the call as a client would."""

    def __init__(self, url: str, **kwargs):
        self.ids: list[int] = []
        self.error: Exception | None = None
        self.finish: str | None = None
        self._call = None
        self._kwargs, self._url = kwargs, url
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        timeout = self._kwargs.pop("timeout_s", None)
        with grpc.insecure_channel(self._url) as channel:
            self._call = GenerationStub(channel).Generate(build_request(**self._kwargs), timeout=timeout)
            try:
                for r in self._call:
                    self.ids += list(r.token_ids)
                    self.finish = r.finish_reason or None
            except grpc.RpcError as e:
                self.error = RemoteError.from_rpc(e)

    def cancel(self):
        deadline = time.monotonic() + 5
        while self._call is None and time.monotonic() < deadline:
            time.sleep(0.001)
        self._call.cancel()

    def join(self, timeout_s: float = 60.0) -> Background:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "request did not end in time"
        return self
