"""The KV layout descriptor both ends of a pair exchange before any KV moves, who holds which kv heads, and the
resharding plan: which sending rank ships which heads to which receiving rank, in messages of what shape."""
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


def sender_of_head(num_kv_heads: int, tp_size: int, head: int) -> int:
    """The one sending rank chosen to ship global head `head`: the lowest rank that holds it."""
    if num_kv_heads >= tp_size:
        return head // (num_kv_heads // tp_size)
    return -(-head * tp_size // num_kv_heads)  # ceil: the first rank r with r*H//tp == head


@dataclass(frozen=True)
class SendSlice:
    """This sending rank ships global heads `heads` to receiving rank `dst_rank`."""

    dst_rank: int
    heads: HeadRange


def plan_sends(src: KVLayout, dst_tp_size: int) -> list[SendSlice]:
    """Every receiving rank gets each of its heads from exactly one sending rank; this rank's share."""
    slices = []
    for dst_rank in range(dst_tp_size):
        start, end = heads_of_rank(src.num_kv_heads, dst_tp_size, dst_rank)
        mine = [h for h in range(start, end)
                if sender_of_head(src.num_kv_heads, src.tp_size, h) == src.tp_rank]
        if mine:
            # The heads a rank holds are contiguous, so its share of another rank's range is too.
            assert mine == list(range(mine[0], mine[-1] + 1)), mine
            slices.append(SendSlice(dst_rank, (mine[0], mine[-1] + 1)))
    return slices


def message_shape(layout: KVLayout, num_blocks: int, num_heads: int, max_bytes: int) -> tuple[int, int]:
    """(layers_per_message, blocks_per_message): messages as large as the staging buffer allows.

    Whole layers are grouped while they fit (fewer, larger sends); a layer too large is split by blocks.
    """
    # bytes of one layer of one block (K and V)
    unit = 2 * num_heads * layout.block_size * layout.head_dim * layout.torch_dtype.itemsize
    if unit > max_bytes:
        raise TransferError(f"staging buffer of {max_bytes} bytes cannot hold one layer of one block "
                            f"({unit})")
    layer_bytes = unit * num_blocks
    if layer_bytes <= max_bytes:
        return min(layout.num_layers, max_bytes // layer_bytes), num_blocks
    return 1, max_bytes // unit
