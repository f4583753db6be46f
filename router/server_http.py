"""The OpenAI-compatible HTTP front door: routes, server-sent events, error bodies, health, metrics, status.

`build_app(core, ...)` makes the FastAPI app over a `RouterCore`; `start_http_server(app, host, port)`
serves it with uvicorn on the caller's event loop (the process that owns the loop owns its signals).

Errors are OpenAI's bodies, `{"error": {"message", "type", "param", "code"}}`, with the status of the
error's code: a client's mistake is never a 500. Once a stream has started, an error arrives as one
`data: {"error": ...}` event followed by `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from pdserve.errors import PdserveError
from pdserve.router.frontend import GenerateInput, RouterCore
from pdserve.router.http_errors import ApiError, BodyGuard, ClientGone, from_validation
from pdserve.router.metrics import CONTENT_TYPE, Metrics
from pdserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ParamError,
    chat_inputs,
    completion_inputs,
)
from pdserve.router.openai_serving import ChatFormat, CompletionFormat, FanOut, ResponseFormat

log = logging.getLogger(__name__)
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # SSE events; json.dumps would build one per call


def build_app(core: RouterCore, *, api_key: str | None = None, max_request_bytes: int = 1 << 20,
              body_timeout_s: float = 30.0, metrics: Metrics | None = None,
              default_max_tokens: int | None = None) -> FastAPI:
    """The HTTP API over `core`.

    `api_key`: when set, every `/v1/` route wants `Authorization: Bearer <api_key>` (401 otherwise);
    `/health` and `/metrics` stay open. `max_request_bytes`: larger bodies get 413 before any parsing,
    chunked ones included; a body not whole within `body_timeout_s` gets 408. `default_max_tokens`: a chat
    request's `max_tokens` when it gives none (None: the model's context length).
    """
    metrics = metrics or Metrics()
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyGuard, api_key=api_key, max_request_bytes=max_request_bytes,
                       body_timeout_s=body_timeout_s, metrics=metrics)
    _add_error_handlers(app, metrics)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatCompletionRequest)
        model = _served_model(core, body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        inputs = chat_inputs(body, request_id, default_max_tokens or core.model_info().max_model_len)
        fmt = ChatFormat(core, request_id, model, body.n, body.logprobs, body.return_tokens_as_token_ids)
        return await _respond(request, core, inputs, fmt, body.stream, body.include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionRequest)
        model = _served_model(core, body.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        fmt = CompletionFormat(core, request_id, model, body.n, body.logprobs is not None,
                               body.return_tokens_as_token_ids)
        return await _respond(request, core, completion_inputs(body, request_id), fmt, body.stream, body.include_usage)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[_model_card(core)]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        _served_model(core, model)
        return _model_card(core).model_dump()

    _add_service_routes(app, core, metrics)
    return app


def _add_service_routes(app: FastAPI, core: RouterCore, metrics: Metrics):
    """What operators and their tools read: pools and workers, health, Prometheus metrics."""

    @app.get("/v1/status")
    async def status():
        return core.status()

    @app.get("/health")
    async def health():
        serving = core.is_serving()
        return JSONResponse({"status": "serving" if serving else "not serving"}, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.expose(), media_type=CONTENT_TYPE)


async def _parse(request: Request, schema: type[BaseModel]):
    """The body as `schema`, whatever its Content-Type says (`curl -d` sends a form's)."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise from_validation(e) from None


def _served_model(core: RouterCore, requested: str | None) -> str:
    served = core.model_info().model
    if requested is not None and requested != served:
        raise ApiError(404, f"The model '{requested}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
    return served


def _model_card(core: RouterCore) -> ModelCard:
    info = core.model_info()
    return ModelCard(id=info.model, max_model_len=info.max_model_len)


async def _respond(request: Request, core: RouterCore, inputs: list[GenerateInput], fmt: ResponseFormat,
                   stream: bool, include_usage: bool) -> Response:
    """Run the choices; a whole response, or an SSE stream once the first delta came (so that an error
    before it, e.g. a full queue, still gets its own status)."""
    fan = FanOut(core, inputs)
    try:
        if not stream:
            return JSONResponse(await _until_disconnected(request, _collect(fan, fmt)))
        first = await _until_disconnected(request, anext(fan))
    except BaseException:
        fan.close()
        raise
    return _EventStream(fan, _events(fan, fmt, first, include_usage))


class _EventStream(StreamingResponse):
    """An SSE response that closes its choices however it ends: done, failed, or cancelled when the
    client went away (then possibly before its body generator ever ran, so the generator cannot)."""

    def __init__(self, fan: FanOut, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.fan = fan

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.fan.close()  # synchronous: it runs even inside the cancelled scope


async def _collect(fan: FanOut, fmt: ResponseFormat) -> dict:
    try:
        async for index, delta in fan:
            fmt.add(index, delta, stream=False)
        return fmt.response()
    finally:
        fan.close()


async def _events(fan: FanOut, fmt: ResponseFormat, first, include_usage: bool):
    """The SSE body: the chunks, the usage when asked, then `[DONE]` (after an error event, if one came)."""
    try:
        index, delta = first
        while True:
            chunk = fmt.add(index, delta, stream=True)
            if chunk is not None:
                yield _event(chunk)
            index, delta = await anext(fan)
    except StopAsyncIteration:
        if include_usage:
            yield _event(fmt.usage_chunk())
    except Exception as e:  # noqa: BLE001 -- the status line is gone: the error becomes an event
        yield _event(_api_error(e).body())
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {_JSON.encode(payload)}\n\n"


async def _until_disconnected(request: Request, awaitable):
    """Await `awaitable`, unless the client disconnects first: then cancel it and raise ClientGone."""
    work = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        return work.result()
    raise ClientGone()


async def _disconnected(request: Request):
    # The body is read already: the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, PdserveError):
        return ApiError(e.code.http_status, e.message, param=e.param if isinstance(e, ParamError) else None,
                        code=e.code.grpc_name.lower())
    log.exception("internal error answering a request", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", code="internal")


def _add_error_handlers(app: FastAPI, metrics: Metrics):
    """Errors the front door raises itself are counted here; the core counts its own."""

    async def own(request: Request, e: Exception):
        error = _api_error(e)
        metrics.error(error.code)
        return error.response()

    async def from_core(request: Request, e: PdserveError):
        return _api_error(e).response()

    async def http(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        error = ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code)
        metrics.error(error.code)
        return error.response()

    async def gone(request: Request, e: ClientGone):
        return Response(status_code=499)

    for kind in (ApiError, ParamError, Exception):
        app.add_exception_handler(kind, own)
    app.add_exception_handler(PdserveError, from_core)
    app.add_exception_handler(HTTPException, http)
    app.add_exception_handler(ClientGone, gone)


class HttpServer:
    """A running uvicorn server on the caller's loop; `port` is the bound one (a free one for port 0)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, port: int):
        self._server, self._task, self.port = server, task, port

    async def stop(self, grace_s: float = 5.0):
        """Stop accepting and close idle connections; responses still open after `grace_s` are cancelled
        (a cancelled stream aborts its requests in the core). Drain the core first to let them finish."""
        self._server.config.timeout_graceful_shutdown = grace_s  # read by uvicorn when it shuts down
        self._server.should_exit = True
        await self._task


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The process that runs this loop owns SIGINT/SIGTERM (drain, then stop): uvicorn leaves them alone.
        yield


async def start_http_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> HttpServer:
    """Serve `app` on `host:port` from the running event loop; returns once it accepts connections.
    Binding errors (port in use) raise OSError here."""
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    # NOTE: asyncio turns Nagle's algorithm off only on sockets made with proto IPPROTO_TCP, which this one (proto
    # 0) is not; the connections accepted from it inherit the option. With Nagle on, a response's body waits for
    # the client's delayed ACK of its head: 40 ms on every answer but a connection's first.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():  # failed before it listened
            task.result()
            raise RuntimeError("the HTTP server stopped before it started")
        await asyncio.sleep(0.01)
    return HttpServer(server, task, sock.getsockname()[1])
