"""The model's shape and variant flags, read from a Hugging Face `config.json` (shapes: engine/model_shape.py)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from pdserve.engine.model_shape import ModelShape, load_model_shape
from pdserve.errors import ConfigError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or {"rope_type": "llama3"|"linear", ...}
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    checkpoint_dtype: torch.dtype
    eos_token_ids: tuple[int, ...]

    def resolve_dtype(self, dtype: str) -> torch.dtype:
        """`auto` keeps the checkpoint's dtype."""
        return self.checkpoint_dtype if dtype == "auto" else _DTYPES[dtype]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


def _rope(cfg) -> tuple[float, dict | None]:
    # transformers >= 5 folds theta and scaling into `rope_parameters`; older releases use
    # `rope_theta` and `rope_scaling`. Read either.
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))  # one of ROPE_TYPES (model_shape.py)
    if rope_type == "default":
        return theta, None
    return theta, {**params, "rope_type": rope_type}


def _eos_ids(path: Path, cfg) -> tuple[int, ...]:
    ids = getattr(cfg, "eos_token_id", None)
    gen = path / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        try:
            ids = GenerationConfig.from_pretrained(path).eos_token_id or ids
        except (OSError, ValueError) as e:
            raise ConfigError(f"model: {gen}: {str(e).splitlines()[0]}") from None
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)


def load_model_spec(path: Path) -> ModelSpec:
    from transformers import AutoConfig

    shape = load_model_shape(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model: {Path(path) / 'config.json'}: {str(e).splitlines()[0]}") from None
    theta, scaling = _rope(cfg)
    window = getattr(cfg, "sliding_window", None)
    if shape.architecture.startswith("Qwen") and not getattr(cfg, "use_sliding_window", False):
        window = None  # Qwen configs carry a window size even when it is off
    shapes = {f.name: getattr(shape, f.name) for f in fields(ModelShape) if f.name != "dtype_name"}
    return ModelSpec(
        **shapes,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=window,
        checkpoint_dtype=_DTYPES[shape.dtype_name],
        eos_token_ids=_eos_ids(path, cfg),
    )
