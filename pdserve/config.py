"""Deployment configuration: one YAML file, validated at load against a typed schema.

Unknown keys, duplicate keys and values of the wrong type are errors (strict types: YAML's
`yes` is a boolean, never an integer, and "5" is a string). Every error names the file, the
field path and what is wrong. A relative model path resolves against the YAML file's folder.
Values derived at run time (the resolved model folder, the number of KV blocks) live with the
engine, not here; what can be checked against the model's own files without loading its
weights is in `pdserve.validate`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pdserve.errors import ConfigError

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"


def _power_of_two(v: int) -> int:
    if v & (v - 1):
        raise ValueError(f"must be a power of two, got {v}")
    return v


class _Strict(BaseModel):
    # NOTE: strict: no bool -> int, str -> int or int -> bool coercion (an int is still a valid float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class PoolConfig(_Strict):
    """A pool of identical workers; each worker is a gang of `tp_size` ranks."""

    count: int = Field(1, ge=1)
    tp_size: int = Field(1, ge=1)  # which sizes a model can run is checked against its heads (pdserve.validate)
    # Ray custom resources each worker's placement asks for: pins the pool to nodes started with them.
    resources: dict[str, float] = {}
    # GPUs per rank (a fraction shares a GPU: prefill and decode on one card, each with its own share of the
    # memory through gpu_memory_utilization); None: 1 on CUDA, none on CPU.
    num_gpus: float | None = Field(None, gt=0.0, le=1.0)


class RouterConfig(_Strict):
    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = None

    @model_validator(mode="after")
    def _ports_distinct(self) -> RouterConfig:
        if self.grpc_port == self.http_port and self.grpc_port != 0:  # 0: the OS picks a free port for each
            raise ValueError(f"grpc_port and http_port are both {self.grpc_port}; they must differ")
        return self


class LimitsConfig(_Strict):
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int = Field(4096, ge=1)
    max_request_bytes: int = Field(1 << 20, ge=1)
    request_body_timeout_s: float = Field(30.0, gt=0)  # an HTTP body must arrive whole within this (408)
    max_concurrent_requests: int = Field(256, ge=1)
    max_queued_requests: int = Field(1024, ge=0)


class RayConfig(_Strict):
    address: str | None = None  # None: start a local cluster; "auto": join the running one


class KVTransferConfig(_Strict):
    """The `kv_transfer:` section: how prefill workers ship KV to decode workers. Every field but `transport`
    is the field of the same name of `pdserve.kv_transfer.TransferConfig` (the meaning of each is told
    there), with the same default: the measured best (docs/benchmarks.md)."""

    # auto: IPC where the sender reaches the receiver's GPU (same node: same GPU, or peer access), else NCCL
    # (torch.distributed; gloo on CPU); grpc anywhere. A kind named here is used as is.
    transport: Literal["auto", "ipc", "nccl", "gloo", "grpc"] = "auto"
    timeout_s: float = Field(30.0, gt=0.0)
    connect_timeout_s: float = Field(20.0, gt=0.0)
    idle_timeout_s: float = Field(60.0, gt=0.0)
    staging_buffers: int = Field(2, ge=1)
    staging_bytes: int = Field(512 << 20, ge=1)
    taper_bytes: int = Field(128 << 20, ge=0)
    grpc_chunk_bytes: int = Field(4 << 20, ge=1)
    receives_ahead: int = Field(2, ge=1)
    cuda_graphs: bool = False
    copy_sm_fraction: float = Field(0.5, gt=0.0, le=1.0)
    spin_for_header: bool = True
    sender_spin_s: float = Field(0.02, ge=0.0)
    kv_first_poll_s: float = Field(0.0002, ge=0.0)
    trace: bool | Literal["host"] = False

    def transfer_config(self):
        """This section as the `TransferConfig` that KVSender and KVReceiver take."""
        from pdserve.kv_transfer import TransferConfig  # imports torch: only where transfers are made

        return TransferConfig(**self.model_dump(exclude={"transport"}))


class DeploymentConfig(_Strict):
    """What a user writes in a deployment YAML file; every field has a default."""

    model: str = EMBEDDED_MODEL
    # A folder with the tokenizer's files, or the embedded model's name; None: the model's own folder. For
    # a model folder without one (dummy weights at a real model's shape), or a tokenizer of one's own.
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    seed: int = 0  # for dummy weights
    device: Literal["auto", "cpu", "cuda"] = "auto"
    block_size: int = Field(16, ge=1, le=256)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    cpu_kv_cache_gib: float = Field(1.0, gt=0.0)
    num_kv_blocks: int | None = Field(None, ge=1)  # overrides memory-based sizing
    max_num_seqs: int = Field(128, ge=1)
    max_num_batched_tokens: int = Field(4096, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    enable_cuda_graphs: bool = True
    # Plan and enqueue the next step before reading the sampled tokens of the one in flight (the host's work
    # overlaps the device's). None: on where the model runs on a GPU, off on CPU (nothing to overlap there).
    async_scheduling: bool | None = None
    # TP > 1 on GPUs, small batches: the row-parallel projections' GEMM pushes its rows into the peers'
    # all-reduce buffers itself, so the all-reduce after it only waits and sums (docs/decisions.md). Off by
    # default until measured on two GPUs.
    push_gemm: bool = False
    disaggregated: bool = True
    prefill: PoolConfig = PoolConfig()
    decode: PoolConfig = PoolConfig()
    kv_transfer: KVTransferConfig = KVTransferConfig()
    rank_timeout_s: float = Field(60.0, gt=0.0)
    # A request whose decode worker dies is re-prefilled from its prompt and the tokens already streamed
    # and continued on another decode worker, at most this many times (0: it fails with UNAVAILABLE).
    migration_limit: int = Field(3, ge=0)
    router: RouterConfig = RouterConfig()
    limits: LimitsConfig = LimitsConfig()
    ray: RayConfig = RayConfig()

    _block_size_power_of_two = field_validator("block_size")(_power_of_two)

    @model_validator(mode="after")
    def _budget_holds_a_sequence(self) -> DeploymentConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode each step"
            )
        return self


_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type")


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<top level>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        if e["type"] in _TYPE_ERRORS:
            msg += f", got {e['input']!r}"  # e.g. True where YAML read `yes`
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def parse_config(data: object, source: str = "<config>", overrides: dict | None = None) -> DeploymentConfig:
    """Validate `data` (a parsed YAML document) with `overrides` on top of it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <top level>: expected a mapping, got {type(data).__name__}")
    try:
        return DeploymentConfig.model_validate({**data, **(overrides or {})})
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path | None = None, **overrides: object) -> DeploymentConfig:
    """Load a deployment file (None: the embedded default) and apply the keyword overrides that are not None.

    A relative `model:` or `tokenizer:` path in the file resolves against the file's folder; one given as
    an override (the command line's `--model`) against the current directory.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if path is None:
        return parse_config({}, "<defaults>", overrides)
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, dict):
        data = {**data, "model": resolve_model_path(data.get("model", EMBEDDED_MODEL), path)}
        if data.get("tokenizer") is not None:
            data["tokenizer"] = resolve_model_path(data["tokenizer"], path)
    return parse_config(data, str(path), overrides)


def resolve_model_path(model: object, config_path: str | Path | None) -> object:
    """A relative model folder named in the file at `config_path`, made absolute against that file's folder;
    the embedded model's name, absolute paths and values that are not strings (errors later) as they are."""
    if not isinstance(model, str) or model == EMBEDDED_MODEL or config_path is None:
        return model
    folder = os.path.expanduser(model)
    return folder if os.path.isabs(folder) else os.path.abspath(Path(config_path).parent / folder)


def read_yaml(path: Path) -> object:
    """One YAML document from `path`; every way it can be unreadable is a ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file: byte 0x{raw[e.start]:02x} at offset {e.start} "
                          f"is not UTF-8") from None
    try:
        loader = yaml.SafeLoader(text)  # the reader checks every character here
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"{path}: not a YAML text file: character U+{e.character:04X} at offset {e.position} "
                          f"is not allowed") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _reject_duplicate_keys(node, (), path)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        # PyYAML's own order is context, problem: "while parsing X" reads better after, "expected X" before
        if not e.context:
            what = e.problem
        elif e.context.startswith("while"):
            what = f"{e.problem} ({e.context})"
        else:
            what = f"{e.context}, {e.problem}"
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    finally:
        loader.dispose()


def _reject_duplicate_keys(node: yaml.Node, fields: tuple[str, ...], path: Path) -> None:
    """YAML itself keeps the last of two equal keys; in a deployment file two are a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                line = key.start_mark.line + 1
                raise ConfigError(f"{path}:{line}: {'.'.join((*fields, name))}: duplicate key")
            seen.add(name)
            _reject_duplicate_keys(value, (*fields, name), path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*fields, str(i)), path)
