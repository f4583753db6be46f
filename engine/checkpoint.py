"""What a safetensors checkpoint must hold for a model's shapes, checked from the files' headers alone.

`check_checkpoint` reads each file's header (names, shapes and byte ranges; no data) and compares
every tensor the engine loads with the shape config.json implies, so a damaged or truncated file, a
missing tensor or a config.json that describes another model is one error naming the file and
tensor, before any weight is copied. No torch: validation runs it before anything heavy is imported.
"""
from __future__ import annotations

import json
from pathlib import Path

from pdserve.engine.model_shape import ModelShape
from pdserve.errors import ConfigError

HEADER_LIMIT = 100 << 20  # the safetensors format's own bound on a header


def expected_shapes(spec: ModelShape) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name (Hugging Face's, without the `model.` prefix) -> the shape config.json implies."""
    hidden, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    shapes = {"embed_tokens.weight": (spec.vocab_size, hidden), "norm.weight": (hidden,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, hidden)
    layer = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if spec.qkv_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if spec.qk_norm:
        layer |= {"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)}
    for i in range(spec.num_layers):
        shapes |= {f"layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model: no *.safetensors files in {folder} (use load_format: dummy for random weights)")
    return files


def read_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from one file's header (format: an 8-byte little-endian header length, a JSON
    header of name -> dtype, shape, data offsets, then the data); a damaged or truncated file is a ConfigError."""
    def damaged(why: str) -> ConfigError:
        return ConfigError(f"model: {file} is not a readable safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if n is None or n > min(size - 8, HEADER_LIMIT):
            raise damaged(f"{size} bytes: no whole header")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            shapes = {name: tuple(t["shape"]) for name, t in tensors.items()}
            end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise damaged("its header is not a safetensors header") from None
    if 8 + n + end != size:
        raise damaged(f"truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return shapes


def check_checkpoint(spec: ModelShape) -> None:
    """Every tensor the model needs is in the folder's safetensors files, at the shape config.json implies."""
    expected = expected_shapes(spec)
    found: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(spec.path):
        for name, shape in read_shapes(file).items():
            name = name.removeprefix("model.")
            want = expected.get(name)
            if want is not None and shape != want:
                raise ConfigError(
                    f"model: {file.name} holds {name} of shape {list(shape)}, but {spec.path / 'config.json'} "
                    f"implies {list(want)}: the config does not match the weights"
                )
            found[name] = shape
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"model: the checkpoint in {spec.path} lacks {', '.join(missing[:3])}{more}")
