"""A deployment checked against its model's own files, without loading any weights.

What `pdserve config validate` prints and what `pdserve serve` and `pdserve generate` check
before they start a worker: the model folder exists (a relative one resolves against the
deployment file's folder), its config.json is whole and its safetensors files agree with it
(headers only), every pool's `tp_size` is one the engine can split the model's heads over,
`max_model_len` is within the model's own limit, and, where the workers run on this machine's
CPU, their KV caches fit its memory. Each error is one ConfigError naming the file and field.
"""
from __future__ import annotations

import glob
from pathlib import Path

from pdserve.config import DeploymentConfig, resolve_model_path
from pdserve.errors import ConfigError, PdserveError


def validate_deployment(config: DeploymentConfig, path: str | Path | None = None) -> DeploymentConfig:
    """Check `config` (loaded from the YAML file at `path`, or None for the built-in default) against its
    model; return it with its model folder resolved, or raise ConfigError."""
    config = config.model_copy(update={"model": resolve_model_path(config.model, path)})
    shape = check_model(config, path)
    pools = {"decode": config.decode} | ({"prefill": config.prefill} if config.disaggregated else {})
    for name, pool in pools.items():
        check_tp_size(shape, pool.tp_size, _field(path, f"{name}.tp_size"))
    if runs_here_on_cpu(config):  # the workers share this machine's memory
        check_kv_memory(config, shape, [pool.tp_size for pool in pools.values() for _ in range(pool.count)], path)
    return config


def check_model(config: DeploymentConfig, path: str | Path | None = None):
    """The model's `ModelShape` (config.json alone: no torch, no transformers to import), once its folder,
    config.json, weights' headers (unless dummy) and `max_model_len` are checked. The embedded model is
    converted here if it never was."""
    from pdserve.engine.checkpoint import check_checkpoint
    from pdserve.engine.model_shape import check_max_model_len, load_model_shape
    from pdserve.engine.model_source import resolve_model

    try:
        shape = load_model_shape(resolve_model(config.model))
        if config.load_format != "dummy":
            check_checkpoint(shape)
    except PdserveError as e:
        message = e.message if e.message.startswith("model:") else f"model: {e.message}"
        raise ConfigError(_field(path, message)) from None
    check_max_model_len(shape, config.max_model_len, _field(path, "max_model_len"))
    return shape


def tp_sizes_for(shape, limit: int) -> list[int]:
    """Every TP size up to `limit` the engine can split this model over."""
    return [n for n in range(1, limit + 1) if _tp_problem(shape, n) is None]


def _tp_problem(shape, tp: int) -> str | None:
    """Why `tp` ranks cannot run this model (None: they can). Mirrors the engine's own splits
    (engine/parallel.py `kv_head_range`, `q_head_range`; the MLP's column/row split)."""
    kv, group = shape.num_kv_heads, shape.num_heads // shape.num_kv_heads
    if tp > kv and (tp % kv or group % (tp // kv)):
        return (f"more ranks than its {kv} kv heads must be a multiple of them, each head's {group} query heads "
                f"split evenly over its ranks")
    if shape.intermediate_size % tp:
        return f"its intermediate size {shape.intermediate_size} does not split over {tp} ranks"
    return None


def check_tp_size(shape, tp: int, field: str) -> None:
    problem = _tp_problem(shape, tp)
    if problem is not None:
        sizes = ", ".join(map(str, tp_sizes_for(shape, max(tp, 2 * shape.num_heads))))
        raise ConfigError(f"{field}: {tp} ranks cannot run this model: {problem} (sizes that can: {sizes})")


def check_kv_memory(config: DeploymentConfig, shape, tp_sizes: list[int], path: str | Path | None = None) -> None:
    """The KV caches of CPU ranks (every rank of a worker of each TP size in `tp_sizes`) fit this machine's
    available memory; each rank sizes its own cache (engine/model_runner.py)."""
    from pdserve.engine.memory import host_memory_available

    ranks = sum(tp_sizes)
    if config.num_kv_blocks is not None:
        field = "num_kv_blocks"
        itemsize = shape.dtype_bytes(config.dtype)
        per_head = config.num_kv_blocks * 2 * shape.num_layers * shape.head_dim * config.block_size * itemsize
        need = sum(per_head * -(-shape.num_kv_heads // tp) * tp for tp in tp_sizes)  # a rank holds >= 1 head
    else:
        field, need = "cpu_kv_cache_gib", int(config.cpu_kv_cache_gib * 2**30) * ranks
    available = host_memory_available()
    if need > available:
        raise ConfigError(_field(path, f"{field}: {ranks} rank(s) need {need / 2**30:.1f} GiB of KV cache; "
                                       f"this machine has {available / 2**30:.1f} GiB available"))


def runs_here_on_cpu(config: DeploymentConfig) -> bool:
    """The ranks run on this machine (a local Ray cluster, or in-process) and on its CPU (as
    engine/model_runner.py `wants_cuda` decides, without importing the engine)."""
    if config.ray.address is not None or config.device == "cuda":
        return False
    # NOTE: `auto` without importing torch (seconds): a machine whose GPUs this process can use has their
    # device nodes. The rank's own check before it allocates (engine/model_runner.py) is exact.
    return config.device == "cpu" or not glob.glob("/dev/nvidia[0-9]*")


def _field(path: str | Path | None, message: str) -> str:
    return message if path is None else f"{path}: {message}"

