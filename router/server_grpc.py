"""The gRPC front door: pdserve.v1.Generation over a `RouterCore`, with health, reflection and an API key.

- Generate streams the core's deltas; a `PdserveError` ends the call with its code's gRPC status
  (INVALID_ARGUMENT naming the field, RESOURCE_EXHAUSTED, UNAVAILABLE, ...). A client cancel, a
  deadline or a server stop closes the core's iterator, which aborts the request in the core.
- grpc.health.v1.Health answers SERVING while the core says `is_serving()` and `set_serving` has not
  turned it off (draining); the overall ("") and the Generation service's status move together.
- Server reflection lists Generation, Health and itself.
- With an API key, Generation's methods need metadata `authorization: Bearer <key>`
  (UNAUTHENTICATED otherwise); health and reflection stay open, as load balancers and tools expect.
- Requests over `max_request_bytes` are refused by gRPC itself (RESOURCE_EXHAUSTED); bytes that do not
  parse as the method's request message (truncated, invalid UTF-8 in a string) get INVALID_ARGUMENT.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.api import pdserve_pb2 as pb
from pdserve.api import pdserve_pb2_grpc as pb_grpc
from pdserve.errors import ConfigError, PdserveError
from pdserve.router import grpc_convert
from pdserve.router.frontend import RouterCore

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_POLL_S = 0.5  # how soon the health service follows the core's `is_serving()`


async def _abort_with(context: grpc.aio.ServicerContext, err: PdserveError):
    await context.abort(grpc.StatusCode[err.code.grpc_name], err.message)


class Malformed:
    """A request whose bytes did not parse; its handler answers INVALID_ARGUMENT with `reason`."""

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(message_type):
    """A request deserializer that hands bytes which do not parse to the handler as `Malformed`.

    NOTE: gRPC answers a deserializer's exception with UNKNOWN, which reads as the server's fault.
    """
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return Malformed(f"malformed {message_type.DESCRIPTOR.full_name}: {e}")

    return parse


async def _refuse_malformed(request, context: grpc.aio.ServicerContext):
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)


class GenerationServicer(pb_grpc.GenerationServicer):
    """pdserve.v1.Generation: converts, calls the core, streams back."""

    def __init__(self, core: RouterCore, default_max_tokens: int):
        self.core = core
        self.default_max_tokens = default_max_tokens

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        await _refuse_malformed(request, context)
        try:
            generate_input = grpc_convert.to_generate_input(request, self.default_max_tokens)
        except PdserveError as err:
            await _abort_with(context, err)
        request_id = generate_input.request_id
        failure: PdserveError | None = None
        try:
            # NOTE: aclosing: whatever ends this handler (cancel, deadline, error, server stop) closes the
            # core's iterator, and closing it is how the core learns to abort the request.
            async with contextlib.aclosing(self.core.generate(generate_input)) as deltas:
                async for delta in deltas:
                    yield grpc_convert.to_response(request_id, delta)
        except PdserveError as err:
            failure = err
        except Exception:
            log.exception("request %s failed", request_id)
            # never a client's fault; nothing of the server's insides goes out
            failure = PdserveError(f"internal error (request {request_id})")
        if failure is not None:  # after the close: the request is gone from the core when the status goes out
            await _abort_with(context, failure)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await _refuse_malformed(request, context)
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must not be empty")
        return pb.AbortResponse(aborted=await self.core.abort(request.request_id))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await _refuse_malformed(request, context)
        return grpc_convert.to_model_info(self.core.model_info())


def _add_generation_service(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """As the generated `add_GenerationServicer_to_server`, with lenient request deserializers."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_lenient(pb.GenerateRequest),
            response_serializer=pb.GenerateResponse.SerializeToString),
        "Abort": grpc.unary_unary_rpc_method_handler(
            servicer.Abort, request_deserializer=_lenient(pb.AbortRequest),
            response_serializer=pb.AbortResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_lenient(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GENERATION_SERVICE, handlers),))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to the services under `protected` (method prefixes) without the bearer key."""

    def __init__(self, api_key: str, protected: tuple[str, ...] = (f"/{GENERATION_SERVICE}/",)):
        self._expected = f"Bearer {api_key}".encode()
        self._protected = protected

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._protected):
            return handler
        if self._authorized(handler_call_details.invocation_metadata or ()):
            return handler
        return _unauthenticated_like(handler)

    def _authorized(self, metadata) -> bool:
        given = next((m.value for m in metadata if m.key == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given, self._expected)  # constant time: no key guessing by timing


def _unauthenticated_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that refuses the call with UNAUTHENTICATED."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong API key (metadata 'authorization: Bearer <key>')")

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class GrpcServer:
    """A running gRPC front door: `port` (the bound one), `set_serving`, `stop`."""

    def __init__(self, server: grpc.aio.Server, port: int, core: RouterCore, health_servicer):
        self.port = port
        self._server = server
        self._core = core
        self._health = health_servicer
        self._enabled = True
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._health_task = self._loop.create_task(self._follow_core_health())

    def set_serving(self, serving: bool) -> None:
        """False: NOT_SERVING whatever the core says (draining); True: follow `core.is_serving()` again.
        Safe from any thread (a signal handler, another loop)."""
        self._enabled = serving
        self._loop.call_soon_threadsafe(self._wake.set)

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new calls, give running ones `grace_s` seconds, then cancel them
        (which aborts their requests in the core)."""
        self._health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._health_task
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    def _core_serving(self) -> bool:
        try:
            return self._core.is_serving()
        except Exception:  # a failing probe must not end the health service: it reports NOT_SERVING
            log.exception("core.is_serving() failed")
            return False

    async def _follow_core_health(self) -> None:
        status = None
        while True:
            serving = self._enabled and self._core_serving()
            new = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            if new != status:
                status = new
                for service in ("", GENERATION_SERVICE):
                    await self._health.set(service, status)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEALTH_POLL_S)


async def start_grpc_server(
    core: RouterCore,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    max_request_bytes: int = 1 << 20,
    max_tokens_limit: int | None = None,
) -> GrpcServer:
    """Serve pdserve.v1.Generation (plus health and reflection) on `host:port` (0: a free port).

    `max_tokens_limit` (the deployment's `limits.max_tokens`) bounds the default for requests that
    name no `max_tokens`; requests over it are the core's to refuse, as for HTTP.
    """
    default_max_tokens = min(grpc_convert.DEFAULT_MAX_TOKENS, max_tokens_limit or grpc_convert.DEFAULT_MAX_TOKENS)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key)] if api_key else None,
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            # NOTE: gRPC sets SO_REUSEPORT by default: a second server would share a taken port silently
            ("grpc.so_reuseport", 0),
        ],
    )
    _add_generation_service(GenerationServicer(core, default_max_tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise ConfigError(f"router.grpc_port: cannot listen on {address}: {e}") from None
    await server.start()
    log.info("gRPC listening on %s", address.rsplit(":", 1)[0] + f":{bound}")
    return GrpcServer(server, bound, core, health_servicer)
