"""Reading one rank's shard of a checkpoint tensor without materialising the rest."""
from __future__ import annotations

import torch


def narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """`loaded` is a tensor or a lazy safetensors slice; only the rows/cols asked for are read."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * dim + [slice(start, start + size)]
    return loaded[tuple(index)]


def full(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def shape(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def copy_into(param: torch.Tensor, src: torch.Tensor) -> None:
    assert param.shape == src.shape, f"shard shape {tuple(src.shape)} != parameter shape {tuple(param.shape)}"
    param.data.copy_(src)
