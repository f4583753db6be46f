"""A scripted RouterCore and a real HTTP server on loopback for the HTTP API's tests."""
from __future__ import annotations

import asyncio
import threading
import time

from pdserve.router.frontend import GenerateDelta, GenerateInput, ModelInfo, Usage
from pdserve.router.metrics import Metrics
from pdserve.router.server_http import build_app, start_http_server

MODEL = "fake-model"
API_KEY = "test-key"
MAX_REQUEST_BYTES = 16 * 1024
HANG = "hang"  # a script item: the stream waits until closed


def default_script(request: GenerateInput) -> list:
    """Three deltas naming Paris; a seed shows in the text, so choices of n > 1 differ."""
    seed = request.params.seed
    words = ["The capital", " of France", f" is Paris (seed {seed})."]
    prompt_len = len(request.token_ids or ()) or 7
    deltas = [GenerateDelta(w, [10 + i]) for i, w in enumerate(words)]
    if request.params.logprobs is not None:
        for i, d in enumerate(deltas):
            d.logprobs = [{"token_logprob": -0.5 - i, "top": {10 + i: -0.5 - i, 99: -3.0}}]
    deltas[-1].finish_reason = "stop"
    deltas[-1].usage = Usage(prompt_tokens=prompt_len, completion_tokens=3)
    return deltas


class FakeCore:
    """Replays `script(request)`: deltas, exceptions (raised there), HANG; records requests and closes."""

    def __init__(self):
        self.script = default_script
        self.delay_s = 0.0  # between deltas
        self.serving = True
        self.requests: list[GenerateInput] = []
        self.closed: list[str] = []  # request ids whose iterator was closed before it ended

    def model_info(self) -> ModelInfo:
        return ModelInfo(model=MODEL, max_model_len=2048, vocab_size=256, eos_token_ids=(2,))

    async def generate(self, request: GenerateInput):
        self.requests.append(request)
        try:
            for item in self.script(request):
                if isinstance(item, BaseException):
                    raise item
                if item == HANG:
                    await asyncio.Event().wait()
                yield item
                await asyncio.sleep(self.delay_s)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed.append(request.request_id)
            raise

    def token_text(self, token_id: int) -> str:
        return f"<{token_id}>"

    async def abort(self, request_id: str) -> bool:
        return False

    def is_serving(self) -> bool:
        return self.serving

    def status(self) -> dict:
        worker = {"name": "decode-0", "node": "n0", "pid": 1, "healthy": True, "kv_blocks_used": 3,
                  "kv_blocks_total": 64, "running": 1, "waiting": 0}
        return {"pools": [{"role": "decode", "workers": [worker]}], "queued": 0}

    def wait_closed(self, request_id_prefix: str, timeout_s: float) -> float:
        """Seconds until a request whose id starts with the prefix was closed; AssertionError past the bound."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if any(r.startswith(request_id_prefix) for r in self.closed):
                return time.monotonic() - start
            time.sleep(0.01)
        raise AssertionError(f"no request {request_id_prefix}* closed within {timeout_s} s: {self.closed}")


class ServerThread:
    """`build_app(core)` served by uvicorn on an event loop of its own thread (the tests' clients block)."""

    def __init__(self, core: FakeCore, **app_args):
        self.core, self.metrics = core, Metrics()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = build_app(core, metrics=self.metrics, **app_args)
        self.server = self.call(start_http_server(app, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.port}"

    def call(self, coro, timeout_s: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self):
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
