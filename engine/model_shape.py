"""A model's shapes, read from its `config.json` alone (no torch, no transformers): what validation needs.

`ModelSpec` (engine/model_config.py) takes every shape from here and only the rest (rope, norm eps,
EOS ids, sliding window) from `transformers`, so a deployment validated against these numbers is
the model the engine builds. A field the shapes depend on is required, never a library default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pdserve.errors import ConfigError, UnsupportedModelError

# architecture name -> QK-norm (Qwen3); everything else is read from the config's own fields
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": False,
    "Qwen3ForCausalLM": True,
}
# Fields a config.json must give: the library's defaults for them (a 4096-wide model...) would silently
# describe some other model than the weights beside them. Llama alone defaults its kv heads to its heads.
REQUIRED_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "max_position_embeddings")
REQUIRED_BY_ARCHITECTURE = {
    "MistralForCausalLM": ("num_key_value_heads",),
    "Qwen2ForCausalLM": ("num_key_value_heads",),
    "Qwen3ForCausalLM": ("num_key_value_heads", "head_dim"),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ROPE_TYPES = ("default", "llama3", "linear")


@dataclass(frozen=True)
class ModelShape:
    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype_name: str  # the checkpoint's: a key of DTYPE_BYTES

    def dtype_bytes(self, dtype: str) -> int:
        """Bytes per element at the deployment's `dtype` (`auto`: the checkpoint's)."""
        return DTYPE_BYTES[self.dtype_name if dtype == "auto" else dtype]


def check_max_model_len(shape, max_model_len: int | None, field: str = "max_model_len") -> None:
    """Positions past the model's own limit were never trained (and would size the rotary tables): as vLLM."""
    if max_model_len is not None and max_model_len > shape.max_position_embeddings:
        raise ConfigError(
            f"{field}: {max_model_len} is above this model's limit of {shape.max_position_embeddings} tokens "
            f"(max_position_embeddings in {shape.path / 'config.json'})"
        )


def read_config_json(path: Path) -> dict:
    """The folder's config.json as a dict, checked for everything the shapes need."""
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
    missing = [k for k in REQUIRED_FIELDS + REQUIRED_BY_ARCHITECTURE.get(arch, ()) if k not in raw]
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
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"model: {file}: dtype {dtype!r} is not supported ({', '.join(DTYPE_BYTES)} are)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported (llama3, linear are)")
    return raw


def load_model_shape(path: Path) -> ModelShape:
    raw = read_config_json(path)
    arch, heads = raw["architectures"][0], raw["num_attention_heads"]
    return ModelShape(
        path=Path(path),
        architecture=arch,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        max_position_embeddings=raw["max_position_embeddings"],
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(raw.get("attention_bias", False)) or arch == "Qwen2ForCausalLM",
        qk_norm=SUPPORTED_ARCHITECTURES[arch],
        dtype_name=raw.get("dtype") or raw.get("torch_dtype") or "float32",
    )
