"""What the KV transfer benchmark moves: the cache's shape and contents, the staging configurations it
tries, and the checksum that verifies a transfer."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kv_transfer import KVLayout, TransferConfig

SENDER, RECEIVER = 0, 1


@dataclass(frozen=True)
class Shape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim * \
            getattr(torch, self.dtype).itemsize


LLAMA3_8B = Shape(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
TINY = Shape(num_layers=4, num_kv_heads=2, head_dim=32, block_size=16, dtype="bfloat16")


@dataclass(frozen=True)
class Staging:
    """One staging configuration: buffers x MiB, first/last messages tapered down to taper_mib (0: off);
    spin: the receiver spins for headers (TransferConfig.spin_for_header); copy_sm_fraction: of the SMs the
    gathers and scatters run on (TransferConfig.copy_sm_fraction)."""

    buffers: int
    mib: int
    taper_mib: float
    spin: bool = False
    copy_sm_fraction: float = TransferConfig.copy_sm_fraction
    # other TransferConfig fields, as (name, value) pairs
    overrides: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str, default: Staging) -> Staging:
        """'4x256', '4x256/8' (taper MiB after the slash), '4x256/8@0.5' (copies on half the SMs),
        '4x256/8+spin' or '4x256+block', then any other TransferConfig fields as ':name=value'
        ('2x512:receives_ahead=1'); what is not said is `default`'s."""
        text, *fields = text.split(":")
        overrides = []
        for field in fields:
            name, _, value = field.partition("=")
            if name not in TransferConfig.__dataclass_fields__ or not value:
                raise ValueError(f"sweep entry {text!r}: {field!r} is not NAME=VALUE of a TransferConfig field")
            overrides.append((name, float(value)))
        text, _, wait = text.partition("+")
        text, _, fraction = text.partition("@")
        size, _, taper = text.partition("/")
        buffers, _, mib = size.partition("x")
        spin = {"spin": True, "block": False, "": default.spin}[wait]
        return cls(int(buffers), int(mib), float(taper) if taper else default.taper_mib, spin,
                   float(fraction) if fraction else default.copy_sm_fraction, tuple(overrides))

    def __str__(self) -> str:
        return (f"{self.buffers}x{self.mib}/{self.taper_mib:g}@{self.copy_sm_fraction:g}"
                + ("+spin" if self.spin else "+block") + "".join(f":{k}={v:g}" for k, v in self.overrides))

    def config(self, stage_timeout: float) -> TransferConfig:
        return TransferConfig(timeout_s=stage_timeout, connect_timeout_s=stage_timeout, idle_timeout_s=600,
                              staging_buffers=self.buffers, staging_bytes=self.mib << 20,
                              taper_bytes=int(self.taper_mib * 2**20), spin_for_header=self.spin,
                              copy_sm_fraction=self.copy_sm_fraction,
                              **{k: type(getattr(TransferConfig, k))(v) for k, v in self.overrides})


def make_cache(args, rank: int, device: torch.device) -> tuple[torch.Tensor, KVLayout]:
    s = args.shape
    num_blocks = 2 * max(args.all_sizes) // s.block_size  # twice what the largest prompt needs: ids spread out
    cache = torch.empty(s.num_layers, 2, num_blocks, s.num_kv_heads, s.block_size, s.head_dim,
                        dtype=getattr(torch, s.dtype), device=device)
    if rank == SENDER:
        cache.normal_()
    else:
        cache.zero_()
    return cache, KVLayout.of_cache(cache, "llama-3-8b-shape", s.num_kv_heads, 1, 0)


def checksum(cache: torch.Tensor, ids: list[int]) -> int:
    """Exact and order-independent: the blocks' 16-bit patterns summed as integers, a layer at a time."""
    index = torch.tensor(ids, device=cache.device)
    return sum(layer.index_select(1, index).view(torch.int16).to(torch.int64).sum().item() for layer in cache)
