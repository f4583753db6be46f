"""Building a model for one TP rank and filling it, tensor by tensor, from safetensors files.

Each parameter's owning layer reads only its shard through a lazy safetensors slice, so a
rank never holds the whole checkpoint, and no state dict is ever built.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pdserve.engine.checkpoint import check_checkpoint, checkpoint_files
from pdserve.engine.layers.loading import copy_into, full
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.models.llama import LlamaForCausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.errors import ConfigError


def build_model(spec: ModelSpec, tp: TPGroup, dtype: torch.dtype, device: torch.device,
                max_positions: int, load_format: str = "auto", seed: int = 0) -> LlamaForCausalLM:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(spec, tp, max_positions)
    finally:
        torch.set_default_dtype(old)
    if load_format == "dummy":
        init_dummy(model, seed)
    else:
        load_safetensors(model, spec.path)
    return model.eval()


def init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes, small enough that activations stay finite."""
    gen = None
    for name, p in model.named_parameters():
        if gen is None:  # drawn on the parameters' own device: an 8B model initialises in seconds
            gen = torch.Generator(p.device).manual_seed(seed)
        p.data.uniform_(-0.05, 0.05, generator=gen)
        if name.endswith("norm.weight"):
            p.data += 1.0


def _checkpoint_to_param(name: str, packed: dict) -> tuple[str, object]:
    name = name.removeprefix("model.")
    for ckpt_part, (param_part, shard_id) in packed.items():
        if f".{ckpt_part}." in name:
            return name.replace(ckpt_part, param_part), shard_id
    return name, None


def load_safetensors(model: LlamaForCausalLM, folder: Path) -> None:
    check_checkpoint(model.spec)  # headers only: a damaged file or a shape config.json contradicts fails here
    files = checkpoint_files(folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = set(dict(model.named_parameters()))
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                name, shard_id = _checkpoint_to_param(ckpt_name, model.packed_modules)
                if name not in params or (name == "lm_head.weight" and model.spec.tie_word_embeddings):
                    continue  # e.g. rotary inv_freq buffers, or a tied head saved twice
                module = model.get_submodule(name.rsplit(".", 1)[0])
                loader = getattr(module, "weight_loader", None)
                loaded = f.get_slice(ckpt_name)
                if loader is None:
                    copy_into(params[name], full(loaded))
                else:
                    loader(params[name], loaded, shard_id)
                missing.discard(name)
    if missing:
        raise ConfigError(f"model: checkpoint in {folder} lacks tensors for {sorted(missing)[:5]}")
