"""A tensor-parallel gang: `tp_size` Ray actors in one STRICT_PACK placement group.

To the rest of the system the gang is one engine (`add_request`, `step`, `abort`,
`generate`), whatever its size. Every call waits at most `rank_timeout_s`, and also
watches the other ranks' step loops: if any rank dies, the pending call fails at once
with `WorkerFailedError` instead of hanging in a collective. A failed gang can be
rebuilt with `restart()`.
"""
from __future__ import annotations

import logging

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pdserve.cluster.tp_rank import TPRank
from pdserve.config import DeploymentConfig
from pdserve.engine.llm_engine import run_to_completion
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_runner import wants_cuda
from pdserve.engine.model_source import resolve_model
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import PdserveError, ResourceExhaustedError, WorkerFailedError

log = logging.getLogger(__name__)

# Every rank's environment. NVLink multicast stays off in every process we start (it can take a
# shared host's GPUs down). Each rank sees only its own GPU, as device 0, which torch's symmetric
# memory would otherwise take for two ranks sharing one GPU (the peer mappings are right either way).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
            "TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1"}
LOAD_TIMEOUT_S = 600.0  # model load and KV profiling: far longer than a step, still bounded

_RemoteRank = ray.remote(TPRank)


class TPGang:
    def __init__(self, config: DeploymentConfig, tp_size: int):
        path = resolve_model(config.model)  # convert the embedded model once, here, not per rank
        self.config = config.model_copy(update={"model": str(path.absolute())})  # the ranks may not share our cwd
        self.spec = load_model_spec(path)
        self.tp_size = tp_size
        self.use_gpus = wants_cuda(config)
        self.timeout = config.rank_timeout_s
        self.loops: list = []  # ranks > 0: their step loops, watched by every wait
        self._start()

    @classmethod
    def local(cls, config: DeploymentConfig, tp_size: int) -> TPGang:
        """Join the configured Ray cluster, or start a local one. Ray's own logs and the ranks' output reach
        the terminal only when pdserve logs at INFO (`-v`)."""
        if not ray.is_initialized():
            verbose = log.getEffectiveLevel() <= logging.INFO
            ray.init(address=config.ray.address or "local", include_dashboard=False, log_to_driver=verbose,
                     logging_level=logging.WARNING if verbose else logging.ERROR)
        return cls(config, tp_size)

    def _start(self) -> None:
        n, gpus = self.tp_size, 1 if self.use_gpus else 0
        bundle = {"CPU": 1, "GPU": gpus} if gpus else {"CPU": 1}
        self._check_cluster_fits(bundle)
        self.pg = placement_group([bundle] * n, strategy="STRICT_PACK")
        self.ranks, self.loops = [], []
        try:
            self._start_ranks(bundle)
        except BaseException:
            self._release()  # a gang that failed to start leaves no rank or placement behind
            raise

    def _start_ranks(self, bundle: dict[str, int]) -> None:
        n, gpus = self.tp_size, bundle.get("GPU", 0)
        if not self.pg.wait(timeout_seconds=self.timeout):
            free = ray.available_resources()
            raise ResourceExhaustedError(
                f"tp {n} needs {self._needs(bundle)} on one node; they did not come free within "
                f"{self.timeout:.0f}s (free in the cluster now: {self._amounts(bundle, free)})"
            )
        self._wait(self.pg.ready(), LOAD_TIMEOUT_S, "placement group")  # its readiness task, run in the group
        cfg = self.config.model_dump()
        self.ranks = [
            _RemoteRank.options(
                num_cpus=1, num_gpus=gpus, runtime_env={"env_vars": NCCL_ENV},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg, i, n)
            for i in range(n)
        ]
        host, port = self._wait(self.ranks[0].host_store.remote(), self.timeout, "rank 0 store")
        self._wait_all([r.join.remote(host, port) for r in self.ranks], self.timeout, "process group")
        infos = self._wait_all([r.load.remote() for r in self.ranks], LOAD_TIMEOUT_S, "model load")
        self.num_blocks, self.max_model_len = infos[0]["num_blocks"], infos[0]["max_model_len"]
        self.symmetric_all_reduce = infos[0]["symmetric_all_reduce"]  # small all-reduces over peer memory
        self.loops = [r.serve_steps.remote() for r in self.ranks[1:]]
        self.broken = False

    def _check_cluster_fits(self, bundle: dict[str, int]) -> None:
        """A gang that no node of the cluster can hold would wait for resources forever: fail at once."""
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        if any(all(res.get(k, 0) >= v * self.tp_size for k, v in bundle.items()) for res in nodes):
            return
        largest = max(nodes, key=lambda res: [res.get(k, 0) for k in bundle], default={})
        where = "the cluster has" if len(nodes) == 1 else "its largest node has"
        raise ResourceExhaustedError(f"tp {self.tp_size} needs {self._needs(bundle)}, {where} "
                                     f"{self._amounts(bundle, largest)}")

    def _needs(self, bundle: dict[str, int]) -> str:
        return " and ".join(f"{v * self.tp_size} {k}s" for k, v in bundle.items())

    @staticmethod
    def _amounts(bundle: dict[str, int], resources: dict) -> str:
        return " and ".join(f"{resources.get(k, 0):g}" if len(bundle) == 1 else f"{resources.get(k, 0):g} {k}s"
                            for k in bundle)

    # --- bounded waiting ------------------------------------------------------------------
    def _wait(self, ref, timeout: float, what: str):
        return self._wait_all([ref], timeout, what)[0]

    def _wait_all(self, refs: list, timeout: float, what: str) -> list:
        watched = list(refs) + self.loops
        results = {}
        while len(results) < len(refs):
            ready, _ = ray.wait(watched, num_returns=1, timeout=timeout)
            if not ready:
                self.broken = True
                raise WorkerFailedError(f"tp gang: no answer to {what} within {timeout:.0f}s")
            if ready[0] not in refs:
                self._loop_ended(ready[0], what)
            results[ready[0]] = self._get(ready[0], what)  # a rank's error ends the wait at once
            watched.remove(ready[0])
        return [results[r] for r in refs]

    def _loop_ended(self, ref, what: str) -> None:
        self.broken = True
        rank = 1 + self.loops.index(ref)
        try:
            ray.get(ref, timeout=1)
            reason = "its step loop stopped"
        except Exception as e:  # noqa: BLE001 (any way a rank can end is a failure to report)
            reason = type(e).__name__
        raise WorkerFailedError(f"tp gang: rank {rank} failed during {what} ({reason})")

    def _get(self, ref, what: str):
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PdserveError):
                raise e.cause from None
            self.broken = True
            raise WorkerFailedError(f"tp gang: {what} failed on a rank: {e.cause!r}") from None
        except ray.exceptions.RayError as e:
            self.broken = True
            raise WorkerFailedError(f"tp gang: {what} failed: {type(e).__name__}") from None

    def _call(self, method, *args):
        if self.broken:
            raise WorkerFailedError("tp gang: broken by an earlier failure; restart() it")
        return self._wait(method.remote(*args), self.timeout, method._method_name)

    # --- the engine interface -------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None):
        return self._call(self.ranks[0].add_request, prompt_token_ids, params, request_id)

    def step(self):
        return self._call(self.ranks[0].step)

    def abort(self, request_id: str) -> None:
        self._call(self.ranks[0].abort, request_id)

    def has_unfinished(self) -> bool:
        return self._call(self.ranks[0].has_unfinished)

    def free_blocks(self) -> tuple[int, int]:
        return self._call(self.ranks[0].free_blocks)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        return run_to_completion(self, prompts, params)

    # --- lifecycle ------------------------------------------------------------------------
    def shutdown(self) -> bool:
        """Stop the step loops if the gang is healthy, then kill every rank and free the group. True when
        rank 0 stopped the gang on request (within the timeout); False when it was broken or did not."""
        clean = False
        if not self.broken:
            # Only rank 0's answer is awaited: the other ranks' step loops end here by design (rank 0 stops
            # them), which elsewhere would mean a failed rank.
            ref = self.ranks[0].shutdown.remote()
            ready, _ = ray.wait([ref], num_returns=1, timeout=self.timeout)
            try:
                clean = bool(ready) and ray.get(ready[0], timeout=self.timeout) is None
            except ray.exceptions.RayError as e:
                log.warning("tp gang: rank 0 failed to stop the gang (%s); killing the ranks", type(e).__name__)
            if not ready:
                log.warning("tp gang: rank 0 did not stop the gang within %.0fs; killing the ranks", self.timeout)
        self._release()
        return clean

    def _release(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.pg)
        self.loops = []

    def restart(self) -> None:
        self.shutdown()
        self._start()
