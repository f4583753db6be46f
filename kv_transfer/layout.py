"""The KV layout descriptor both ends of a pair exchange before any KV moves, and who holds which kv heads."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pdserve.engine.parallel import kv_head_range
from pdserve.errors import TransferError

HeadRange = tuple[int, int]


def heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadRange:
    """The global kv heads [start, end) that TP rank `tp_rank` of `tp_size` holds: exactly what the
    engine's QKV layer loads (`kv_head_range`), so transfers and models can never disagree."""
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        raise TransferError(f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}")
    return kv_head_range(num_kv_heads, tp_size, tp_rank)


@dataclass(frozen=True)
class KVLayout:
    """What one rank's paged cache looks like: kv_cache [L, 2, num_blocks, local heads, block_size, head_dim].

    The number of blocks is each side's own business and is not part of the contract.
    """

    model: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    num_layers: int
    block_size: int
    head_dim: int
    num_kv_heads: int  # total over all TP ranks
    tp_size: int
    tp_rank: int

    # NOTE: these fields must agree between the two ends of a pair; tp_size / tp_rank legitimately differ.
    SHARED_FIELDS = ("model", "dtype", "num_layers", "block_size", "head_dim", "num_kv_heads")

    def __post_init__(self):
        if not 0 <= self.tp_rank < self.tp_size:
            raise TransferError(f"tp_rank {self.tp_rank} is outside tp_size {self.tp_size}")
        heads_of_rank(self.num_kv_heads, self.tp_size, self.tp_rank)  # validates the TP split

    @property
    def heads(self) -> HeadRange:
        """The global kv heads this rank holds."""
        return heads_of_rank(self.num_kv_heads, self.tp_size, self.tp_rank)

    @property
    def num_local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V, for this rank's heads."""
        elems = self.num_layers * 2 * self.num_local_heads * self.block_size * self.head_dim
        return elems * self.torch_dtype.itemsize

    def with_rank(self, tp_size: int, tp_rank: int) -> KVLayout:
        return dataclasses.replace(self, tp_size=tp_size, tp_rank=tp_rank)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> KVLayout:
        return cls(**fields)

    @classmethod
    def of_cache(cls, kv_cache: torch.Tensor, model: str, num_kv_heads: int, tp_size: int, tp_rank: int):
        """The layout of a rank's cache tensor [L, 2, N, H_local, Bs, D]."""
        num_layers, two, _, local_heads, block_size, head_dim = kv_cache.shape
        assert two == 2, f"kv_cache dim 1 must be 2 (K, V), got {two}"
        layout = cls(model, str(kv_cache.dtype).removeprefix("torch."), num_layers, block_size, head_dim,
                     num_kv_heads, tp_size, tp_rank)
        if layout.num_local_heads != local_heads:
            raise TransferError(f"kv_cache holds {local_heads} kv heads, rank {tp_rank} of {tp_size} "
                                f"should hold {layout.num_local_heads}")
        return layout


def check_match(local: KVLayout, remote: KVLayout, local_role: str, remote_role: str) -> None:
    """Raise TransferError naming the first shared field that differs between the two ends."""
    for name in KVLayout.SHARED_FIELDS:
        mine, theirs = getattr(local, name), getattr(remote, name)
        if mine != theirs:
            raise TransferError(f"KV layout mismatch in field '{name}': {local_role} has {mine!r}, "
                                f"{remote_role} has {theirs!r}")
