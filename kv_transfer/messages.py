"""Typed messages and states shared by both halves of a KV transfer and by every transport."""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, fields

import torch

from pdserve.kv_transfer.layout import HeadRange

Range = tuple[int, int]


class TransferState(enum.Enum):
    """WAITING -> TRANSFERRING -> DONE | FAILED. A FAILED transfer carries the reason in its result."""

    WAITING = "waiting"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


class TransportKind(enum.Enum):
    TORCH = "torch"  # torch.distributed: nccl for CUDA caches, gloo for CPU caches
    GRPC = "grpc"
    IPC = "ipc"  # same node: the sender writes into the receiver's cache, mapped through CUDA IPC


@dataclass(frozen=True)
class Place:
    """Where a rank runs: its node, and its GPU (None on CPU). Compared, never parsed."""

    node: str  # the host's name and boot id: equal only for processes of one running host
    gpu: str | None = None  # the GPU's UUID


@dataclass(frozen=True)
class Endpoint:
    """Where one receiving rank listens. The kind says how to reach it; nothing is parsed from strings.

    `place` says where the receiving rank runs, so that a sender can tell whether it reaches this kind
    (IPC needs the same node and a GPU it can write); `fallback` is the same rank's endpoint of the next
    kind to try when it cannot (`transport: auto`: IPC, then NCCL).
    """

    kind: TransportKind
    host: str
    port: int
    place: Place | None = None
    fallback: Endpoint | None = None


@dataclass(frozen=True)
class Destination:
    """A receiving TP gang: endpoints[r] is receiving rank r; the gang's TP size is len(endpoints)."""

    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class TransferHeader:
    """What one sending rank ships to one receiving rank for one transfer, sent once before its messages.

    Both ends derive the same message sequence from it (message_plan), so on NCCL the receiver posts every
    receive without waiting for a per-message header.
    """

    transfer_id: int
    num_blocks: int
    heads: HeadRange  # global kv heads carried, a sub-range of the receiving rank's heads
    layers_per_message: int
    blocks_per_message: int
    taper_units: int = 0  # > 0: first and last messages shrink down to about this many (layer, block) pairs

    def to_list(self) -> list[int]:
        """[HEADER_LEN]: kind (1 transfer, 0 close), id, n, head start, head end, layers/msg, blocks/msg,
        taper units."""
        return [1, self.transfer_id, self.num_blocks, *self.heads, self.layers_per_message,
                self.blocks_per_message, self.taper_units]

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.to_list(), dtype=torch.int64, device=device)

    @classmethod
    def from_list(cls, values: list[int]) -> TransferHeader | None:
        """None for the close marker."""
        if values[0] == 0:
            return None
        _, tid, n, hs, he, lpm, bpm, taper = values
        return cls(tid, n, (hs, he), lpm, bpm, taper)


HEADER_LEN = 8
CLOSE_MARKER = [0] * HEADER_LEN


@dataclass(frozen=True)
class MessagePart:
    """One message of a transfer: these layers of these blocks (indices into the transfer's block list)."""

    layers: Range
    blocks: Range

    def num_units(self, num_heads: int) -> int:
        """(layer, head, block) triples covered; a transfer is complete when they add up."""
        return (self.layers[1] - self.layers[0]) * (self.blocks[1] - self.blocks[0]) * num_heads


def message_plan(num_layers: int, header: TransferHeader) -> list[MessagePart]:
    """The ordered messages of a transfer: groups of layers, each split into block chunks if too large.

    With `taper_units`, the first message is cut into pieces growing 4x at a time up to the full size and
    the last into pieces shrinking 4x at a time: on CUDA the only copies not hidden behind a send are the
    first gather and the last scatter, so those are kept small while the rest stay as large as staging.
    """
    lpm, bpm, n = header.layers_per_message, header.blocks_per_message, header.num_blocks
    parts = []
    for ls in range(0, num_layers, lpm):
        le = min(ls + lpm, num_layers)
        parts.extend(MessagePart((ls, le), (bs, min(bs + bpm, n))) for bs in range(0, n, bpm))
    if header.taper_units <= 0 or not parts:
        return parts
    first = _taper(parts[0], header.taper_units, small_first=True)
    if len(parts) == 1:
        return first[:-1] + _taper(first[-1], header.taper_units, small_first=False)
    return first + parts[1:-1] + _taper(parts[-1], header.taper_units, small_first=False)


def _taper(part: MessagePart, min_units: int, small_first: bool) -> list[MessagePart]:
    """`part` cut into pieces 4x apart in size, the smallest about min_units (layer, block) pairs: smallest
    first (small_first) or last. Pieces are whole layers, or blocks of one layer."""
    big_pieces, rest = [], part
    while rest.num_units(1) > min_units and (cut := _quarter(rest, small_first)) is not None:
        small, big = cut
        big_pieces.append(big)
        rest = small
    return [rest, *big_pieces[::-1]] if small_first else [*big_pieces, rest]


def _quarter(part: MessagePart, small_first: bool) -> tuple[MessagePart, MessagePart] | None:
    """(small, big): about a quarter of `part` at its start (small_first) or end, and the rest."""
    (ls, le), (bs, be) = part.layers, part.blocks
    if le - ls >= 2:
        k = max(1, (le - ls) // 4)
        cut = ls + k if small_first else le - k
        lo, hi = MessagePart((ls, cut), (bs, be)), MessagePart((cut, le), (bs, be))
    elif be - bs >= 2:
        k = max(1, (be - bs) // 4)
        cut = bs + k if small_first else be - k
        lo, hi = MessagePart((ls, le), (bs, cut)), MessagePart((ls, le), (cut, be))
    else:
        return None
    return (lo, hi) if small_first else (hi, lo)


@dataclass(frozen=True)
class TransferResult:
    """How a transfer ended, as either side saw it."""

    transfer_id: int
    state: TransferState
    num_bytes: int
    duration_s: float  # from expect() / start_send() to the end
    finished_at: float  # time.monotonic() at the end (one clock for every process on a host)
    error: str | None = None
    # When traced (TransferConfig.trace, or trace= per call): this side's kv_transfer.trace.Trace; read its
    # timeline() once the transfer ended. None otherwise.
    trace: object | None = None


@dataclass
class TransferStats:
    """Counters for metrics; read a consistent copy with snapshot()."""

    bytes_moved: int = 0
    transfers_started: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    handshakes_refused: int = 0
    groups_created: int = 0
    groups_torn_down: int = 0
    transfers_drained: int = 0  # receiver: parts of transfers that had ended here, read off their pair and dropped
    graph_transfers: int = 0  # NCCL: transfers launched from a CUDA graph (TransferConfig.cuda_graphs)
    graphs_captured: int = 0
    total_duration_s: float = 0.0
    max_duration_s: float = 0.0

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, **deltas) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def record_finish(self, result: TransferResult) -> None:
        with self._lock:
            if result.state is TransferState.DONE:
                self.transfers_done += 1
                self.bytes_moved += result.num_bytes
            else:
                self.transfers_failed += 1
            self.total_duration_s += result.duration_s
            self.max_duration_s = max(self.max_duration_s, result.duration_s)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TransferConfig:
    """Deadlines and staging sizes. Every wait in a transfer is bounded by one of these."""

    timeout_s: float = 30.0  # a transfer's deadline, from expect() / start_send() unless given per call
    connect_timeout_s: float = 20.0  # handshake and process-group creation of a new pair
    idle_timeout_s: float = 60.0  # a sender closes a pair unused this long; a receiver gives up at twice it
    # Two buffers: one is gathered (or scattered) while the other is on the wire.
    staging_buffers: int = 2
    # Also the largest message. Large messages amortize each NCCL operation's fixed cost; the taper below
    # keeps the copies that cannot overlap a send (first gather, last scatter) small all the same. The
    # default is the best split of 1 GiB of staging measured (docs/benchmarks.md, "Figures behind defaults").
    staging_bytes: int = 512 << 20
    # First and last messages taper down to about this size (0: every message as large as staging); see
    # message_plan. Ignored by gRPC, whose messages are not pipelined.
    taper_bytes: int = 128 << 20
    grpc_chunk_bytes: int = 4 << 20
    # Receiver: at most this many messages of a transfer have their receive posted ahead of their scatter (1:
    # the next receive is posted once the previous message was scattered). Each holds a staging buffer.
    receives_ahead: int = 2
    # NCCL pairs: a transfer whose KV is all saved when its pair thread takes it up is launched from a CUDA
    # graph of its whole message sequence (kv_transfer/graphs.py), captured once per message plan and pair:
    # one host launch per side instead of one per gather, send, receive and scatter.
    cuda_graphs: bool = False
    # CUDA: gathers and scatters run on this fraction of the GPU's SMs (a bounded grid, each program looping
    # over its blocks), leaving the rest to the NCCL kernels they overlap with: on all SMs a copy holds up the
    # send or receive beside it, while on half of them it still outruns the wire (docs/benchmarks.md). 1.0:
    # one program per block and layer.
    copy_sm_fraction: float = 0.5
    # NCCL: how the receiving thread waits for an expected transfer's header. True: it spins a CPU core in the
    # driver until the header lands (wakes within microseconds; a core per connected pair, and only while a
    # transfer is expected and not yet announced). False: it sleeps until the GPU signals (no CPU used
    # however late the sender starts; the wake-up then lies on the critical path: docs/benchmarks.md).
    spin_for_header: bool = True
    # Sender: for this long after its last transfer was queued or finished, a pair's thread polls for the
    # next one (and for the layers of the current one) instead of sleeping on a condition, whose wake-up lies
    # ahead of the first byte (docs/benchmarks.md). Polls yield the GIL every turn. 0: always sleep.
    sender_spin_s: float = 0.02
    # Sender: when a pair's thread takes up a transfer, it polls this long for the first message's layers to
    # be saved. Saved by then: their gather is launched before the header is posted (the KV was there at
    # start_send, or save_kv followed it at once). Not: the header goes first, ahead of the KV.
    kv_first_poll_s: float = 0.0002
    # Record a timeline of every transfer (kv_transfer/trace.py): host stamps and CUDA timing events at each
    # stage, returned in TransferResult.trace. Off: no clock reads, no events. start_send / expect can
    # also turn it on for one transfer.
    trace: bool | str = False  # "host": host stamps only, no CUDA events
