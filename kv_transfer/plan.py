"""Resharding between TP sizes, and how one sending rank splits its part of a transfer into messages."""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.errors import TransferError
from pdserve.kv_transfer.layout import HeadRange, KVLayout, heads_of_rank


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
