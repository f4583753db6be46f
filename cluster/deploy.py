"""A deployment on Ray: the worker pools of a YAML file, each worker an actor in its own placement group,
brought up (bounded) and torn down whole.

Pools: disaggregated, `prefill.count` prefill workers and `decode.count` decode workers; colocated
(`disaggregated: false`), `decode.count` colocated workers. A pool's `resources` (Ray custom resources, e.g.
one a node was started with) pin its workers to the nodes that have them.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
    if config.disaggregated:
        return [("prefill", config.prefill), ("decode", config.decode)]
    return [("colocated", config.decode)]


def connect_ray(config: DeploymentConfig, verbose: bool = False) -> bool:
    """Join the configured cluster, or start a local one sized for the deployment; True if this started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.INFO if verbose else logging.WARNING,
                  log_to_driver=verbose)
    if config.ray.address is None:
        import os

        need = sum(p.count * p.tp_size for _, p in pools_of(config))
        kwargs["num_cpus"] = max(os.cpu_count() or 1, need)
    ray.init(address=config.ray.address, **kwargs)
    return config.ray.address is None


class Deployment:
    def __init__(self, config: DeploymentConfig):
        path = resolve_model(config.model)  # the embedded model is converted once, here, not per worker
        self.model_path = path
        self.config = config.model_copy(update={"model": str(path)})
        self.actors: list = []
        self.groups: list = []

    def start(self) -> list[WorkerHandle]:
        """Create every worker and wait (bounded) until each has loaded; a failure names the worker and
        leaves nothing running."""
        try:
            pending = [self._create(role, pool, i) for role, pool in pools_of(self.config) for i in range(pool.count)]
            return [self._await_load(role, name, actor, ref) for role, name, actor, ref in pending]
        except BaseException:
            self.shutdown()
            raise

    def _create(self, role: str, pool: PoolConfig, index: int):
        name = f"{role}-{index}"
        gpus = (pool.num_gpus or 1) if wants_cuda(self.config) else 0
        bundle = {"CPU": 1, **({"GPU": gpus} if gpus else {}), **pool.resources}
        pg = placement_group([bundle] * pool.tp_size, strategy="STRICT_PACK")
        self.groups.append(pg)
        if not _wait_ready(pg, self.config.rank_timeout_s):
            raise WorkerFailedError(f"{name}: the cluster cannot place a worker needing {bundle} x {pool.tp_size} "
                                    f"within {self.config.rank_timeout_s:.0f}s (cluster has "
                                    f"{_round(ray.cluster_resources())}, free {_round(ray.available_resources())})")
        cls = ray.remote(_worker_classes()[role])
        actor = cls.options(
            num_cpus=1, num_gpus=gpus, max_concurrency=WORKER_CONCURRENCY, name=None,
            runtime_env={"env_vars": NCCL_ENV},
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        ).remote(self.config.model_dump(), name)
        self.actors.append(actor)
        return role, name, actor, actor.load.remote()

    def _await_load(self, role: str, name: str, actor, ref) -> WorkerHandle:
        ready, _ = ray.wait([ref], timeout=LOAD_TIMEOUT_S)
        if not ready:
            raise WorkerFailedError(f"{name} did not come up within {LOAD_TIMEOUT_S:.0f}s")
        try:
            info: WorkerInfo = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise WorkerFailedError(f"{name} failed to start: {e.cause}") from None
        except ray.exceptions.RayError as e:
            raise WorkerFailedError(f"{name} failed to start: {type(e).__name__}") from None
        load = WorkerLoad(0, 0, info.num_blocks, info.num_blocks, 0, 0)
        return WorkerHandle(role, actor, info, load)

    def shutdown(self) -> None:
        """Stop every worker (bounded), then kill the actors and free their placement groups."""
        refs = [a.shutdown.remote() for a in self.actors]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=SHUTDOWN_TIMEOUT_S)
        for a in self.actors:
            ray.kill(a)
        for pg in self.groups:
            remove_placement_group(pg)
        self.actors, self.groups = [], []


def _wait_ready(pg, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    ready, _ = ray.wait([pg.ready()], timeout=max(0.0, deadline - time.monotonic()))
    return bool(ready)


def _round(resources: dict) -> dict:
    return {k: round(v, 2) for k, v in resources.items() if not k.startswith(("node:", "memory",
                                                                               "object_store_memory"))}
