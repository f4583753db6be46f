"""`pdserve serve`: a deployment's workers, the router, and its gRPC and HTTP front doors on one event loop.

Start-up is bounded (each worker must come up within its deadline, or the whole start fails naming it and
leaves nothing running). SIGINT / SIGTERM: stop accepting (health goes NOT_SERVING, new requests get
UNAVAILABLE), let in-flight requests finish for up to `DRAIN_S`, end the rest with UNAVAILABLE, stop the
front doors and the workers, and stop Ray if this process started it.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading

import ray

from pdserve.cluster.deploy import Deployment, connect_ray
from pdserve.config import DeploymentConfig
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_source import resolve_tokenizer
from pdserve.engine.tokenizer import load_tokenizer
from pdserve.router.core import Router
from pdserve.router.metrics import Metrics
from pdserve.router.server_grpc import start_grpc_server
from pdserve.router.server_http import build_app, start_http_server

log = logging.getLogger(__name__)

DRAIN_S = 20.0  # in-flight requests get this long to finish on shutdown


class Server:
    """The running service; `start` and `stop` run on the event loop that serves it."""

    def __init__(self, config: DeploymentConfig, verbose: bool = False):
        self.config, self.verbose = config, verbose
        self.deployment: Deployment | None = None
        self.router: Router | None = None
        self.grpc = self.http = None
        self.started_ray = False
        self._stopping = False
        self._replacing: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.started_ray = connect_ray(self.config, self.verbose) or self.started_ray
        self.deployment = Deployment(self.config)
        try:
            workers = await asyncio.to_thread(self.deployment.start)
            path = self.deployment.model_path
            self.metrics = Metrics()
            tokenizer = load_tokenizer(resolve_tokenizer(self.config.tokenizer, path))
            self.router = Router(self.config, load_model_spec(path), tokenizer, self.config.model,
                                 workers, self.metrics)
            self.router.on_worker_died = self._replace_later
            self.router.start()
            for worker in workers:
                self._watch_gang(worker)
            r, limits = self.config.router, self.config.limits
            self.grpc = await start_grpc_server(self.router, r.host, r.grpc_port, r.api_key,
                                                limits.max_request_bytes, limits.max_tokens)
            app = build_app(self.router, api_key=r.api_key, max_request_bytes=limits.max_request_bytes,
                            body_timeout_s=limits.request_body_timeout_s,
                            metrics=self.metrics, default_max_tokens=limits.max_tokens)
            self.http = await start_http_server(app, r.host, r.http_port)
        except BaseException:
            await self.stop(drain_s=0)
            raise

    def _watch_gang(self, worker) -> None:
        """A TP gang whose other rank dies is dead as a whole: rank 0 is stopped, so the router sees it go."""
        async def watch():
            reason = await self.deployment.gangs[worker.name].watch()
            if not self._stopping and worker.healthy:
                log.error("%s: %s; stopping the gang", worker.name, reason)
                ray.kill(worker.actor)
        self._track(asyncio.ensure_future(watch()))

    def _track(self, task: asyncio.Task) -> None:
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    def _replace_later(self, dead) -> None:
        if self._stopping:
            return
        self._track(asyncio.ensure_future(self._replace(dead)))

    async def _replace(self, dead) -> None:
        """A dead worker's pool starts another in its place; it joins routing once it has loaded."""
        decode = [w for w in self.router.workers if w.role == "decode" and w.healthy]
        try:
            destinations = await asyncio.gather(*[w.actor.destination.remote() for w in decode])
            worker = await asyncio.to_thread(self.deployment.replace, dead, list(destinations))
        except Exception as e:  # noqa: BLE001 (the pool stays short; the status page says so)
            log.error("could not replace %s: %s", dead.name, e)
            return
        if worker.role == "decode":
            dest = await worker.actor.destination.remote()
            prefill = [w for w in self.router.workers if w.role == "prefill" and w.healthy]
            await asyncio.gather(*[w.actor.add_destination.remote(dest) for w in prefill], return_exceptions=True)
        if self._stopping:
            return
        self.router.add_worker(worker, replacing=dead)
        self._watch_gang(worker)
        log.warning("%s replaced by %s", dead.name, worker.name)

    @property
    def grpc_address(self) -> str:
        return f"{self.config.router.host}:{self.grpc.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.router.host}:{self.http.port}"

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self.grpc is not None:
            self.grpc.set_serving(False)
        if self.router is not None:
            await self.router.drain(drain_s)
        if self.grpc is not None:
            await self.grpc.stop(grace_s=2.0)
        if self.http is not None:
            await self.http.stop(grace_s=2.0)
        for task in list(self._replacing):
            task.cancel()
        if self.router is not None:
            await self.router.stop()
        if self.deployment is not None:
            await asyncio.to_thread(self.deployment.shutdown)
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


def serve(config: DeploymentConfig, verbose: bool = False) -> int:
    """Run until SIGINT / SIGTERM; print the addresses once every pool is up."""
    return asyncio.run(_serve(config, verbose))


async def _serve(config: DeploymentConfig, verbose: bool) -> int:
    server = Server(config, verbose)
    # NOTE: Ray's start-up installs its own SIGTERM handler (which aborts the process), so ours go in after it.
    server.started_ray = connect_ray(config, verbose)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.ensure_future(server.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal during start-up: stop what came up
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await server.stop(drain_s=0)
        return 0
    starting.result()
    print(f"pdserve: serving {config.model} | gRPC {server.grpc_address} | HTTP {server.http_url}", flush=True)
    await stopped
    print("pdserve: shutting down (draining in-flight requests)", file=sys.stderr, flush=True)
    await server.stop()
    return 0


class ServerThread:
    """A `Server` on its own event loop thread, for tests and tools that drive it from synchronous code."""

    def __init__(self, config: DeploymentConfig):
        self.server = Server(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="pdserve-server", daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()
        except BaseException:
            self._close_loop()
            raise
        return self.server

    def run(self, coro, timeout_s: float | None = None):
        """Run a coroutine on the server's loop; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __exit__(self, *exc) -> None:
        try:
            self.run(self.server.stop(drain_s=5.0))
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
