"""A deployment on Ray: the worker pools of a YAML file, each worker an actor in its own placement group,
brought up (bounded) and torn down whole.

Pools: disaggregated, `prefill.count` prefill workers and `decode.count` decode workers; colocated
(`disaggregated: false`), `decode.count` colocated workers. A pool's `resources` (Ray custom resources, e.g.
one a node was started with) pin its workers to the nodes that have them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.kv_rank import ServingRank
from pdserve.cluster.tp_gang import LOAD_TIMEOUT_S, NCCL_ENV
from pdserve.config import DeploymentConfig, PoolConfig
from pdserve.engine.model_runner import wants_cuda
from pdserve.engine.model_source import resolve_model
from pdserve.errors import WorkerFailedError
from pdserve.messages import WorkerInfo, WorkerLoad
from pdserve.router.workers import WorkerHandle

log = logging.getLogger(__name__)

# A worker's own calls (reserve, submit, abort) and the router's long-poll run side by side on it.
WORKER_CONCURRENCY = 16
SHUTDOWN_TIMEOUT_S = 10.0


def _worker_classes():
    from pdserve.decode_worker.colocated import ColocatedWorker
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.prefill_worker.worker import PrefillWorker

    return {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}


def pools_of(config: DeploymentConfig) -> list[tuple[str, PoolConfig]]:
    """In start-up order: decode before prefill (prefill workers are told every decode gang's endpoints)."""
    if config.disaggregated:
        return [("decode", config.decode), ("prefill", config.prefill)]
    return [("colocated", config.decode)]


def connect_ray(config: DeploymentConfig, verbose: bool = False) -> bool:
    """Join the configured cluster, or start a local one sized for the deployment; True if this started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.INFO if verbose else logging.ERROR,
                  log_to_driver=verbose)
    if config.ray.address is None:
        import os

        need = sum(p.count * p.tp_size for _, p in pools_of(config))
        kwargs["num_cpus"] = max(os.cpu_count() or 1, need)
    # NOTE: "local", not None: None would join any Ray cluster already running on this machine.
    ray.init(address=config.ray.address or "local", **kwargs)
    return config.ray.address is None


@dataclass
class _Gang:
    role: str
    name: str
    rank0: object
    peers: list
    load: object  # rank 0's load call
    peer_loads: list
    pool: PoolConfig
    group: object  # its placement group
    step_loops: list = field(default_factory=list)  # ranks > 0: they end only when rank 0 stops the gang

    async def watch(self) -> str:
        """Wait until one of ranks > 0 leaves its step loop; why (a gang without peers waits forever)."""
        if not self.step_loops:
            await asyncio.Event().wait()
        done, _ = await asyncio.wait([asyncio.ensure_future(_outcome(r)) for r in self.step_loops],
                                     return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()


class Deployment:
    def __init__(self, config: DeploymentConfig):
        path = resolve_model(config.model)  # the embedded model is converted once, here, not per worker
        self.model_path = path
        self.config = config.model_copy(update={"model": str(path)})
        self.actors: list = []  # every rank of every worker
        self.workers: list = []  # rank 0 of each
        self.groups: list = []
        self.gangs: dict[str, _Gang] = {}
        self._next_index: dict[str, int] = {}

    def start(self) -> list[WorkerHandle]:
        """Create every worker and wait (bounded) until each has loaded; a failure names the worker and
        leaves nothing running."""
        try:
            handles: list[WorkerHandle] = []
            destinations: list = []
            for role, pool in pools_of(self.config):
                gangs = [self._create(role, pool, self._index(role), destinations) for _ in range(pool.count)]
                handles += [self._await_load(gang) for gang in gangs]
                if role == "decode":
                    destinations = ray.get([h.actor.destination.remote() for h in handles], timeout=60)
            return handles
        except BaseException:
            self.shutdown()
            raise

    def _create(self, role: str, pool: PoolConfig, index: int, destinations: list) -> _Gang:
        """A worker: rank 0 (the worker actor) and, under TP, ranks > 0 in the same placement group."""
        name, n = f"{role}-{index}", pool.tp_size
        gpus = (pool.num_gpus or 1) if wants_cuda(self.config) else 0
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {}), **pool.resources}
        pg = placement_group([bundle] * n, strategy="STRICT_PACK")
        self.groups.append(pg)
        if not _wait_ready(pg, self.config.rank_timeout_s):
            raise WorkerFailedError(f"{name}: the cluster cannot place a worker needing {bundle} x {n} "
                                    f"within {self.config.rank_timeout_s:.0f}s (cluster has "
                                    f"{_round(ray.cluster_resources())}, free {_round(ray.available_resources())})")
        config = self.config.model_dump()

        def options(cls, rank: int, concurrency: int):
            return ray.remote(cls).options(
                num_cpus=1, num_gpus=gpus, max_concurrency=concurrency, runtime_env={"env_vars": NCCL_ENV},
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank))

        extra = (destinations,) if role == "prefill" else ()
        rank0 = options(_worker_classes()[role], 0, WORKER_CONCURRENCY).remote(config, name, n, *extra)
        # ranks > 0 answer rank 0's transfer-report calls beside their step loop
        peers = [options(ServingRank, r, 2).remote(config, r, n, role, destinations) for r in range(1, n)]
        self.actors += [rank0, *peers]
        self.workers.append(rank0)
        if peers:
            host, port = self._get(rank0.host_store.remote(), name, "rendezvous")
            self._get_all([a.join.remote(host, port) for a in (rank0, *peers)], name, "process group")
        gang = _Gang(role, name, rank0, peers, rank0.load.remote(peers), [p.load.remote() for p in peers], pool, pg)
        self.gangs[name] = gang
        return gang

    def _index(self, role: str) -> int:
        """Workers are named `<role>-<n>`, n never reused (a replacement gets the next one)."""
        n = self._next_index.get(role, 0)
        self._next_index[role] = n + 1
        return n

    def replace(self, dead: WorkerHandle, destinations: list) -> WorkerHandle:
        """Remove a dead worker's gang (its other ranks, its placement) and start a new worker in its pool;
        bounded like start-up. `destinations`: the decode gangs a new prefill worker may ship to."""
        old = self.gangs.pop(dead.name)
        for actor in (old.rank0, *old.peers):
            ray.kill(actor)
        remove_placement_group(old.group)
        self.groups.remove(old.group)
        self.workers.remove(old.rank0)
        gang = self._create(old.role, old.pool, self._index(old.role), destinations)
        return self._await_load(gang)

    def _await_load(self, gang: _Gang) -> WorkerHandle:
        info: WorkerInfo = self._get_all([gang.load, *gang.peer_loads], gang.name, "model load", LOAD_TIMEOUT_S)[0]
        if gang.peers:
            peer_infos = ray.get(gang.peer_loads)
            if gang.role == "decode":
                self._get(gang.rank0.set_peer_endpoints.remote([i["endpoint"] for i in peer_infos]), gang.name,
                          "endpoints")
            gang.step_loops = [p.serve_steps.remote() for p in gang.peers]
        load = WorkerLoad(0, 0, info.num_blocks, info.num_blocks, 0, 0)
        return WorkerHandle(gang.role, gang.rank0, info, load)

    def _get(self, ref, name: str, what: str, timeout_s: float | None = None):
        return self._get_all([ref], name, what, timeout_s)[0]

    def _get_all(self, refs: list, name: str, what: str, timeout_s: float | None = None) -> list:
        """Every result within the bound; a worker that fails or does not answer is named."""
        timeout_s = timeout_s or self.config.rank_timeout_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            raise WorkerFailedError(f"{name}: no answer to {what} within {timeout_s:.0f}s")
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            raise WorkerFailedError(f"{name} failed to start ({what}): {e.cause}") from None
        except ray.exceptions.RayError as e:
            raise WorkerFailedError(f"{name} failed to start ({what}): {type(e).__name__}") from None

    def shutdown(self) -> None:
        """Stop every worker (bounded), then kill the actors and free their placement groups."""
        # rank 0 of each gang stops its other ranks' step loops itself
        refs = [a.shutdown.remote() for a in self.workers]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
        for a in self.actors:
            ray.kill(a)
        for pg in self.groups:
            remove_placement_group(pg)
        self.actors, self.workers, self.groups = [], [], []


async def _outcome(ref) -> str:
    try:
        await ref
        return "a rank left its step loop"
    except ray.exceptions.RayError as e:
        return f"a rank failed ({type(e).__name__})"


def _wait_ready(pg, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    ready, _ = ray.wait([pg.ready()], timeout=max(0.0, deadline - time.monotonic()))
    return bool(ready)


def _round(resources: dict) -> dict:
    return {k: round(v, 2) for k, v in resources.items() if not k.startswith(("node:", "memory",
                                                                               "object_store_memory"))}
