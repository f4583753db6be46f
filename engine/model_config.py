"""The model's shape and variant flags, read from a Hugging Face `config.json`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.errors import UnsupportedModelError

# architecture name -> QK-norm (Qwen3); everything else is read from the config's own fields
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
}

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
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (llama3, linear are)")
    return theta, {**params, "rope_type": rope_type}


def _eos_ids(path: Path, cfg) -> tuple[int, ...]:
    ids = getattr(cfg, "eos_token_id", None)
    gen = path / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        ids = GenerationConfig.from_pretrained(path).eos_token_id or ids
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)


def load_model_spec(path: Path) -> ModelSpec:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    arch = (getattr(cfg, "architectures", None) or ["<none given>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    theta, scaling = _rope(cfg)
    num_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    window = getattr(cfg, "sliding_window", None)
    if arch.startswith("Qwen") and not getattr(cfg, "use_sliding_window", False):
        window = None  # Qwen configs carry a window size even when it is off
    return ModelSpec(
        path=path,
        architecture=arch,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(cfg, "attention_bias", False)) or arch == "Qwen2ForCausalLM",
        qk_norm=SUPPORTED_ARCHITECTURES[arch],
        sliding_window=window,
        checkpoint_dtype=dtype,
        eos_token_ids=_eos_ids(path, cfg),
    )
