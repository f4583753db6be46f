"""The model's shape and variant flags, read from a Hugging Face `config.json`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.errors import ConfigError, UnsupportedModelError

# architecture name -> QK-norm (Qwen3); everything else is read from the config's own fields
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
}

# Fields a config.json must give: the library's defaults for them (a 4096-wide model...) would silently
# describe some other model than the weights beside them.
REQUIRED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "max_position_embeddings")

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

        try:
            ids = GenerationConfig.from_pretrained(path).eos_token_id or ids
        except (OSError, ValueError) as e:
            raise ConfigError(f"model: {gen}: {str(e).splitlines()[0]}") from None
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)


def check_max_model_len(spec: ModelSpec, max_model_len: int | None, field: str = "max_model_len") -> None:
    """Positions past the model's own limit were never trained (and would size the rotary tables): as vLLM."""
    if max_model_len is not None and max_model_len > spec.max_position_embeddings:
        raise ConfigError(
            f"{field}: {max_model_len} is above this model's limit of {spec.max_position_embeddings} tokens "
            f"(max_position_embeddings in {spec.path / 'config.json'})"
        )


def read_config_json(path: Path) -> dict:
    """The folder's config.json as a dict, checked for what the engine needs before `transformers` reads it."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"model: cannot read {file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"model: {file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"model: {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"model: {file} is not a JSON object")
    arch = (raw.get("architectures") or ["<none given>"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ConfigError(f"model: {file} lacks required fields: {', '.join(missing)}")
    for key in REQUIRED_FIELDS[1:] + ("num_key_value_heads", "head_dim"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise ConfigError(f"model: {file}: {key} must be a positive integer, got {value!r}")
    heads, kv_heads = raw["num_attention_heads"], raw.get("num_key_value_heads") or raw["num_attention_heads"]
    if heads % kv_heads:
        raise ConfigError(f"model: {file}: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads})")
    return raw


def load_model_spec(path: Path) -> ModelSpec:
    from transformers import AutoConfig

    raw = read_config_json(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"model: {Path(path) / 'config.json'}: {str(e).splitlines()[0]}") from None
    arch = raw["architectures"][0]
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
