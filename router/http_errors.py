"""What the HTTP front door refuses before a route runs, and the shape of every error it answers.

`BodyGuard` checks the API key and the body's size before anything parses the body: a declared
Content-Length over the limit is refused at once; a chunked body is counted as it arrives and refused
as soon as it passes the limit (the guard buffers at most `max_request_bytes`). A body must arrive whole
within `body_timeout_s` of the request's start (408 otherwise): a client that sends it slowly, or never
finishes it, does not hold its connection and buffer for ever.
"""
from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from pdserve.router.metrics import Metrics

_TYPES = {401: "authentication_error", 429: "rate_limit_error"}  # other 4xx: invalid_request_error


class ApiError(Exception):
    """An answer in OpenAI's error shape: `code` is a stable lower-case word (also the metrics' kind)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or f"http_{status}"

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; its requests were aborted."""


def from_validation(e: ValidationError) -> ApiError:
    """A body that does not parse or fit the schema, as the OpenAI API answers it: 400 naming the parameter.

    Of several errors the deepest is named: for a union (`prompt` as text or token ids) it is the member
    the client meant (`prompt[1]: Input should be a valid integer`), not the first member tried.
    """
    errors = e.errors()
    first = max(errors, key=lambda err: len(err["loc"])) if errors else {"type": "", "loc": (), "msg": "invalid"}
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", first["msg"])
        return ApiError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    if not first["loc"]:
        return ApiError(400, "The request body must be a JSON object", code="invalid_argument")
    param = _param(first["loc"])
    if first["type"] == "missing":
        return ApiError(400, f"{param} is required", param=param, code="invalid_argument")
    return ApiError(400, f"{param}: {first['msg']}", param=param, code="invalid_argument")


# Nested fields a client writes; any other name in a location is pydantic's tag for a union member.
_NESTED = {"role", "content", "text", "type", "include_usage"}


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union member tags ('str', 'list[int]') dropped."""
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _NESTED:
            out += f".{part}"
    return out


class BodyGuard:
    """ASGI middleware: 401 without the API key on `/v1/` routes, 413 for a body over the limit."""

    def __init__(self, app, *, api_key: str | None, max_request_bytes: int, body_timeout_s: float, metrics: Metrics):
        self.app, self.api_key, self.max_request_bytes, self.metrics = app, api_key, max_request_bytes, metrics
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._check_headers(scope)
        body = b""
        if error is None:
            body, error = await self._read_body(receive)
        if error is not None:
            self.metrics.error(error.code)
            response = error.response()
            # NOTE: the body is not read (whole): closing is what frees the connection from a client that
            # would go on sending it (slowly).
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        if body is None:  # the client left while sending
            return None
        return await self.app(scope, _replay(body, receive), send)

    def _check_headers(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization")
            if given is None:
                return ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return ApiError(401, "Incorrect API key provided", code="invalid_api_key")
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return ApiError(400, "Content-Length must be a number of bytes", code="invalid_argument")
            if int(declared) > self.max_request_bytes:
                return self._too_large(int(declared))
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, ApiError | None]:
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._read_chunks(receive)
        except TimeoutError:
            return None, ApiError(408, f"The request body did not arrive within {self.body_timeout_s:g} s "
                                       "(limits.request_body_timeout_s)", code="request_timeout")

    async def _read_chunks(self, receive) -> tuple[bytes | None, ApiError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None, self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self, size: int | None) -> ApiError:
        what = f"The request body ({size} bytes)" if size is not None else "The request body"
        return ApiError(413, f"{what} is over the limit of {self.max_request_bytes} bytes (limits.max_request_bytes)",
                        code="request_too_large")


def _replay(body: bytes, receive):
    """The body, already read, as one message; then the client's own messages (its disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
