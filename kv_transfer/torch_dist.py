"""torch.distributed transport: one two-rank process group per (sender rank, receiver rank) pair.

The receiving rank hosts a TCPStore on a port chosen at run time. A sender that needs the pair takes a
connection number from the store, posts its layout, and reads the receiver's; both check them, then both
build a two-rank group (sender rank 0, receiver rank 1) under a store prefix of that number. No global
group exists, so a dead worker breaks only its own pairs. Backend: nccl for CUDA caches, gloo for CPU.

NCCL: the pair's communicator is built inside make_group (see connect_nccl). Each transfer's header is a
64-byte NCCL message ahead of its data; the receiver posts its receive only while it expects a transfer
(torch_ingest), so no store round trip lies between the sender's start and the data.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
import torch.distributed as dist

from pdserve.errors import TransferError
from pdserve.kv_transfer.cuda_wait import sync_event
from pdserve.kv_transfer.graphs import GraphCache
from pdserve.kv_transfer.layout import KVLayout
from pdserve.kv_transfer.messages import CLOSE_MARKER, HEADER_LEN, MessagePart, TransferConfig, TransferHeader
from pdserve.kv_transfer.pair_store import Handshake, _td
from pdserve.kv_transfer.transport import Link

SENDER, RECEIVER = 0, 1


def local_ip_towards(host: str) -> str:
    """The local address that routes to `host` (gloo must bind an address the peer can reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def group_timeout_s(config: TransferConfig) -> float:
    """The group's own timeout, past every deadline we enforce ourselves.

    NOTE: an idle pair keeps a header receive posted for up to twice the idle timeout; NCCL's watchdog must
    not fire first (by default it takes the whole process down).
    """
    return config.connect_timeout_s + 2 * config.idle_timeout_s + config.timeout_s


def make_group(store: dist.Store, conn_id: int, rank: int, device: torch.device, bind_host: str,
               timeout_s: float, deadline: float) -> dist.ProcessGroup:
    """The pair's own two-rank group, connected: blocks until the other end builds it too, at most until
    `deadline` on NCCL (gloo connects within its own timeout, `timeout_s`)."""
    prefixed = dist.PrefixStore(f"pg/{conn_id}", store)
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = _td(timeout_s)
        # NCCL's kernels go first when the GPU is busy (the next gather, scatter or prefill step): a send
        # that waits for SMs stalls its peer too.
        opts.is_high_priority_stream = True
        group = dist.ProcessGroupNCCL(prefixed, rank, 2, opts)
        try:
            connect_nccl(group, rank, device, deadline, conn_id)
        except Exception:
            with contextlib.suppress(Exception):
                group.abort()
            raise
        return group
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = _td(timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    return dist.ProcessGroupGloo(prefixed, rank, 2, opts)


def connect_nccl(group: dist.ProcessGroup, rank: int, device: torch.device, deadline: float,
                 conn_id: int) -> None:
    """Build the pair's NCCL communicator now, with one 8-byte message from sender to receiver.

    NOTE: ProcessGroupNCCL creates its communicator lazily, inside the first send/recv, and that call
    blocks the host until the peer makes its own first call (a rendezvous; this is what the "unbatched
    P2P op ... lazy initialization" warning announces). Left to the first real operation, a receiver that
    posts a receive and only then tells the sender to go waits forever. Here both ends arrive on their own.
    It runs on a helper thread so that the deadline holds even when the peer never comes (the thread is
    then abandoned; the group is aborted by the caller).
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            torch.cuda.set_device(device)
            probe = torch.empty(1, dtype=torch.int64, device=device)  # contents unused: no kernel to load
            work = group.send([probe], RECEIVER, 0) if rank == SENDER else group.recv([probe], SENDER, 0)
            work.wait()
            torch.cuda.current_stream(device).synchronize()
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors.append(e)

    thread = threading.Thread(target=run, name=f"kv-nccl-connect-{conn_id}", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    if thread.is_alive():
        raise TransferError(f"NCCL communicator of pair {conn_id} was not set up before the connect deadline "
                            f"(the other end did not join in time)")
    if errors:
        raise TransferError(f"NCCL communicator of pair {conn_id} could not be set up: {errors[0]}")


def abort_in_background(group: dist.ProcessGroup, name: str, wait_s: float) -> None:
    """Abort an NCCL pair's group on a daemon thread, waiting for it at most `wait_s`: an abort that takes
    long (or never returns: it waits for its kernels to leave) must hold up none of the threads that end
    transfers on time, while a healthy one (milliseconds) is over before the caller goes on."""
    def run() -> None:
        with contextlib.suppress(Exception):
            group.abort()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(wait_s)


def wait_work(work: dist.Work, deadline: float, cuda: bool) -> None:
    """Complete one send/recv within the deadline.

    NOTE: on CUDA this only orders the current stream after the transfer, so the host can post the next
    message at once; the caller bounds the whole transfer with an event (cuda_wait.sync_event). gloo blocks
    the host.
    """
    if cuda:
        work.wait()
    elif not work.wait(_td(deadline - time.monotonic())):
        raise TransferError("torch.distributed operation did not complete")


def recv_header(pg: dist.ProcessGroup, device: torch.device, deadline: float) -> list[int]:
    """gloo pairs: the header as a message of its own, received as soon as the pair is idle."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    work = pg.recv([header], SENDER, 0)
    if not work.wait(_td(deadline - time.monotonic())):
        raise TransferError("no header from the sender")
    return header.tolist()


class TorchDistLink(Link):
    """Sending rank's end of one pair: a handshake, then the pair's own group; rebuilt after a teardown."""

    def __init__(self, host: str, port: int, device: torch.device, config: TransferConfig):
        self.device, self.config = device, config
        self._handshake = Handshake(host, port, config)
        self._bind_host = local_ip_towards(host)
        self._group: dist.ProcessGroup | None = None
        self._cuda = device.type == "cuda"
        # NCCL: nothing waits for the receiver before the first send; is_open is asked while the messages
        # move (pair_worker), and a closed pair is rebuilt and the transfer sent again.
        self.check_after_posting = self._cuda
        # CUDA: where send completions are awaited (see send)
        self._sent = torch.cuda.Stream(device) if self._cuda else None
        # NCCL: this pair's CUDA graphs of whole transfers (pair_worker._post_graph); gone with the pair
        self.graphs = GraphCache() if self._cuda else None

    @property
    def completion_stream(self) -> torch.cuda.Stream | None:
        """CUDA: the stream on which each send's completion is awaited (a trace marks it there)."""
        return self._sent

    def connect(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        remote = self._handshake.exchange(local, transfer_id, deadline)
        connect_deadline = min(deadline, time.monotonic() + self.config.connect_timeout_s)
        self._group = make_group(self._handshake.store, self._handshake.conn_id, SENDER, self.device,
                                 self._bind_host, group_timeout_s(self.config), connect_deadline)
        return remote

    def is_open(self) -> bool:
        return self._group is not None and self._handshake.is_open()

    def begin(self, header: TransferHeader, deadline: float, on_device: torch.Tensor | None) -> None:
        """The transfer's header, ahead of its data on the pair (NCCL: posted, not awaited). `on_device` (CUDA):
        the header already on the GPU, staged through pinned memory with the block ids by the pair worker."""
        if self._cuda:
            self._group.send([on_device], RECEIVER, 0)
        else:
            wait_work(self._group.send([header.to_tensor(self.device)], RECEIVER, 0), deadline, False)

    def send(self, header: TransferHeader, part: MessagePart, payload: torch.Tensor,
             deadline: float) -> torch.cuda.Event | None:
        """Post one message; returns (CUDA) the event after which `payload` may be overwritten.

        NOTE: the send's completion is awaited on a stream of its own, not on the caller's: the caller's
        stream goes on with the next gather while this send runs (NCCL's stream waits only for the gathers
        enqueued before the send).
        """
        # payload: [nbytes] uint8, a view of a staging buffer
        work = self._group.send([payload], RECEIVER, 0)
        if not self._cuda:
            wait_work(work, deadline, False)
            return None
        with torch.cuda.stream(self._sent):
            work.wait()
            sent = torch.cuda.Event()
            sent.record()
        return sent

    def flush(self, deadline: float, after: torch.cuda.Event | None = None) -> None:
        """Every send so far has completed (CUDA: the host blocks on an event after them, or on `after`, the
        end of a transfer launched from a graph; past the deadline the group is aborted, which ends the
        sends, and TransferError is raised)."""
        if self._cuda:
            event = after
            if event is None:
                event = torch.cuda.Event()
                event.record(self._sent)
            sync_event(event, deadline, self._abort, "NCCL send")

    def _abort(self) -> None:
        if (group := self._group) is not None:
            group.abort()

    def close(self, graceful: bool) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        with contextlib.suppress(Exception):
            # NCCL: the mark is the close; a receiver waiting for a header drops the pair when it sees it.
            if graceful and not self._cuda:
                close = torch.tensor(CLOSE_MARKER, dtype=torch.int64, device=self.device)
                wait_work(group.send([close], RECEIVER, 0), time.monotonic() + 1.0, False)
            self._handshake.mark_closed()
        if self._cuda:  # every send has completed (flush) or is abandoned: nothing left to wait for
            abort_in_background(group, f"kv-abort-send-{self._handshake.conn_id}", wait_s=5.0)
