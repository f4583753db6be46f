"""The interface every KV transport implements, in two halves, and where each kind is made.

A transport moves one sending rank's staged messages to one receiving rank. The sending half is a `Link`
(one per pair, owned by the sender's pair worker: connect, then per transfer a header and its messages); the
receiving half is an `Ingest` (one per receiving rank, owned by KVReceiver: it accepts pairs and hands each
message to the receiver's `open_part` / `scatter` / `landed`). Implementations: torch.distributed (NCCL for
CUDA caches, gloo for CPU ones; torch_dist.py, torch_ingest.py), gRPC (grpc_transport.py), and IPC (ipc.py:
a *direct* link, which writes the receiver's blocks itself instead of sending staged messages).
"""
from __future__ import annotations

import abc

import torch

from pdserve.kv_transfer.graphs import GraphCache
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.messages import Endpoint, MessagePart, TransferConfig, TransferHeader, TransportKind


class Link(abc.ABC):
    """Sending rank's end of one pair. Every call is bounded by the deadline it is given."""

    # True: is_open is asked only once a transfer's messages are posted (the pair worker then sends the
    # transfer again over a new pair if the receiver had closed this one), not before each transfer.
    check_after_posting: bool = False
    # CUDA graphs of whole transfers on this pair (TransferConfig.cuda_graphs); None where unsupported.
    graphs: GraphCache | None = None
    # True: the link writes into the receiver's cache itself (`write`): no staging, no messages. A transfer
    # is then begin, a write per group of saved layers, flush.
    direct: bool = False

    @property
    def completion_stream(self) -> torch.cuda.Stream | None:
        """CUDA: the stream on which sends complete (a trace marks them there); None: on the caller's."""
        return None

    @abc.abstractmethod
    def connect(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        """Handshake: exchange layouts (a mismatch raises TransferError naming the field); the remote one."""

    @abc.abstractmethod
    def is_open(self) -> bool:
        """Whether the receiver still holds this pair."""

    @abc.abstractmethod
    def begin(self, header: TransferHeader, deadline: float, on_device: torch.Tensor | None) -> None:
        """A transfer's header, ahead of its messages. `on_device` (CUDA): the header already on the GPU."""

    @abc.abstractmethod
    def send(self, header: TransferHeader, part: MessagePart, payload: torch.Tensor,
             deadline: float) -> torch.cuda.Event | None:
        """Post one message (`payload`: [nbytes] uint8, a view of a staging buffer); returns (CUDA) the event
        after which `payload` may be overwritten, None when it may be at once."""

    def write(self, layers: tuple[int, int], src_cache: torch.Tensor, src_index: torch.Tensor,
              src_heads: tuple[int, int], num_programs: int | None) -> int:
        """Direct links: enqueue (current stream) the copy of these layers of the begun transfer's blocks
        (`src_index` into `src_cache`, this rank's local heads `src_heads`) into the receiver's; the bytes."""
        raise NotImplementedError(f"{type(self).__name__} sends staged messages")

    @abc.abstractmethod
    def flush(self, deadline: float, after: torch.cuda.Event | None = None) -> None:
        """Block until every message posted so far has been sent (or `after`, a graph's last send, ran)."""

    @abc.abstractmethod
    def close(self, graceful: bool) -> None:
        """Tear the pair down; graceful: the receiver is told, not left to time out."""


class Ingest(abc.ABC):
    """Receiving rank's end of every pair to it: listens at `endpoint` and delivers messages to the receiver."""

    endpoint: Endpoint

    @abc.abstractmethod
    def drop_conn(self, conn_id: int) -> None:
        """Tear down one pair (a transfer it carried failed)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop listening and drop every pair."""


def open_link(endpoint: Endpoint, device: torch.device, config: TransferConfig) -> Link:
    """A new, unconnected link to the receiving rank at `endpoint`, of the endpoint's kind (an endpoint
    chosen with place.choose: one this rank reaches)."""
    if endpoint.kind is TransportKind.IPC:
        from pdserve.kv_transfer.ipc import IpcLink
        return IpcLink(endpoint, device, config)
    if endpoint.kind is TransportKind.TORCH:
        from pdserve.kv_transfer.torch_dist import TorchDistLink
        return TorchDistLink(endpoint.host, endpoint.port, device, config)
    from pdserve.kv_transfer.grpc_transport import GrpcLink
    return GrpcLink(endpoint.host, endpoint.port, device, config)


def open_ingest(kind: TransportKind, receiver, host: str) -> Ingest:
    """The receiving end of `kind` for `receiver` (a KVReceiver), listening on `host`."""
    if kind is TransportKind.IPC:
        from pdserve.kv_transfer.ipc import IpcIngest
        return IpcIngest(receiver, host)
    if kind is TransportKind.TORCH:
        from pdserve.kv_transfer.torch_ingest import TorchDistIngest
        return TorchDistIngest(receiver, host)
    from pdserve.kv_transfer.grpc_transport import GrpcIngest
    return GrpcIngest(receiver, host)
