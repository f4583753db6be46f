"""torch.distributed transport: one two-rank process group per (sender rank, receiver rank) pair.

The receiving rank hosts a TCPStore on a port chosen at run time. A sender that needs the pair takes a
connection number from the store, posts its layout, and reads the receiver's; both check them, then both
build a two-rank group (sender rank 0, receiver rank 1) under a store prefix of that number. No global
group exists, so a dead worker breaks only its own pairs. Backend: nccl for CUDA caches, gloo for CPU.

NCCL: the pair's communicator is built inside make_group (see connect_nccl), and transfer headers travel
through the store rather than as NCCL messages, so an idle pair never leaves an NCCL kernel waiting on
the GPU (see announce_header).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import time

import torch
import torch.distributed as dist

from pdserve.errors import TransferError
from pdserve.kv_transfer.layout import KVLayout, check_match
from pdserve.kv_transfer.messages import CLOSE_MARKER, HEADER_LEN, MessagePart, TransferConfig, TransferHeader

SENDER, RECEIVER = 0, 1


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


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


def header_key(conn_id: int, seq: int) -> str:
    return f"conn/{conn_id}/header/{seq}"


def announce_header(store: dist.Store, conn_id: int, seq: int, values: list[int]) -> None:
    """NCCL pairs: the sender posts header `seq` (or the close marker) in the receiver's store.

    NOTE: not an NCCL message on purpose. An NCCL receive posted for a header that may come minutes later
    is a kernel spinning on the receiving GPU all that time: a device-wide synchronize waits for it, and so
    can the first launch of any kernel not loaded yet (CUDA lazy module loading drains the GPU first), so
    the decode rank, or whatever the peer waits on, stalls until the next transfer. With headers in the
    store, NCCL receives are posted only once their sends are on their way.
    """
    store.set(header_key(conn_id, seq), json.dumps(values))


def await_header(store: dist.Store, conn_id: int, seq: int, deadline: float) -> list[int]:
    """Receiver side of announce_header: header `seq` of the pair; TransferError once the deadline passes.

    A store wait cannot be interrupted: whoever drops the pair wakes it by announcing the close marker under
    the awaited number. Use a store client of the waiting thread's own (a client serves one call at a time).
    """
    key = header_key(conn_id, seq)
    try:
        store.wait([key], _td(deadline - time.monotonic()))
    except dist.DistStoreError as e:  # timed out
        raise TransferError("no header from the sender") from e
    values = json.loads(store.get(key))
    store.delete_key(key)
    return values


def wait_work(work: dist.Work, deadline: float, cuda: bool) -> None:
    """Complete one send/recv within the deadline.

    NOTE: on CUDA this only orders the current (side) stream after the transfer, so the host can post the
    next message at once; the caller bounds the whole transfer by polling an event. gloo blocks the host.
    """
    if cuda:
        work.wait()
    elif not work.wait(_td(deadline - time.monotonic())):
        raise TransferError("torch.distributed operation did not complete")


def wait_event(event: torch.cuda.Event, deadline: float, what: str) -> None:
    """Poll a CUDA event until it completes or the deadline passes (a plain synchronize has no deadline)."""
    start = time.monotonic()  # transfers end within microseconds of the check: spin briefly first
    while not event.query():
        now = time.monotonic()
        if now > deadline:
            raise TransferError(f"{what} did not complete within its deadline")
        time.sleep(0 if now < start + 0.02 else 0.0002 if now < start + 1.0 else 0.002)


def recv_header(pg: dist.ProcessGroup, device: torch.device, deadline: float) -> list[int]:
    """gloo pairs: the header as a message of its own (NCCL pairs use announce_header / await_header)."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    work = pg.recv([header], SENDER, 0)
    if not work.wait(_td(deadline - time.monotonic())):
        raise TransferError("no header from the sender")
    return header.tolist()


def closed_key(conn_id: int) -> str:
    return f"conn/{conn_id}/closed"


class Handshake:
    """Sender side of connecting a pair through the receiver's store."""

    def __init__(self, host: str, port: int, config: TransferConfig):
        self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=_td(config.connect_timeout_s))
        self.conn_id = self.store.add("conn/next", 1)

    def exchange(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        """Post our layout, read the receiver's; TransferError naming the field if they differ."""
        hello = {"layout": local.to_dict(), "transfer_id": transfer_id}
        self.store.set(f"conn/{self.conn_id}/hello", json.dumps(hello))
        key = f"conn/{self.conn_id}/reply"
        try:
            self.store.wait([key], _td(deadline - time.monotonic()))
        except dist.DistStoreError as e:  # timed out
            raise TransferError(f"receiver did not answer the KV handshake: {e}") from e
        reply = json.loads(self.store.get(key))
        remote = KVLayout.from_dict(reply["layout"])
        check_match(local, remote, "sender", "receiver")
        return remote

    def is_open(self) -> bool:
        """False once the receiver has torn the pair down."""
        return not self.store.check([closed_key(self.conn_id)])

    def mark_closed(self) -> None:
        self.store.set(closed_key(self.conn_id), "1")


class StoreListener:
    """Receiver side: hosts the store and hands each sender's hello to `on_hello` on a listener thread."""

    # NOTE: polls with check() rather than blocking in wait(): a blocked wait cannot be interrupted at close.
    POLL_S = 0.005

    def __init__(self, host: str, on_hello, config: TransferConfig):
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=_td(config.connect_timeout_s))
        self.port = self.store.port
        self._on_hello, self._config = on_hello, config
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="kv-store-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        conn_id, since = 1, time.monotonic()
        while not self._stop.wait(self.POLL_S):
            key = f"conn/{conn_id}/hello"
            if not self.store.check([key]):
                # Skip a number that a sender took but never used (it died in between).
                stale = time.monotonic() - since > self._config.connect_timeout_s
                if stale and self.store.add("conn/next", 0) > conn_id:
                    conn_id, since = conn_id + 1, time.monotonic()
                continue
            hello = json.loads(self.store.get(key))
            self._on_hello(conn_id, KVLayout.from_dict(hello["layout"]), hello["transfer_id"])
            conn_id, since = conn_id + 1, time.monotonic()

    def reply(self, conn_id: int, layout: KVLayout) -> None:
        self.store.set(f"conn/{conn_id}/reply", json.dumps({"layout": layout.to_dict()}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


class TorchDistLink:
    """Sending rank's end of one pair: a handshake, then the pair's own group; rebuilt after a teardown."""

    def __init__(self, host: str, port: int, device: torch.device, config: TransferConfig):
        self.device, self.config = device, config
        self._handshake = Handshake(host, port, config)
        self._bind_host = local_ip_towards(host)
        self._group: dist.ProcessGroup | None = None
        self._cuda = device.type == "cuda"
        self._seq = 0  # NCCL: number of the next header announced through the store

    def connect(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        remote = self._handshake.exchange(local, transfer_id, deadline)
        connect_deadline = min(deadline, time.monotonic() + self.config.connect_timeout_s)
        self._group = make_group(self._handshake.store, self._handshake.conn_id, SENDER, self.device,
                                 self._bind_host, group_timeout_s(self.config), connect_deadline)
        return remote

    def is_open(self) -> bool:
        return self._group is not None and self._handshake.is_open()

    def begin(self, header: TransferHeader, deadline: float) -> None:
        if self._cuda:
            self._announce(header.to_list())
        else:
            wait_work(self._group.send([header.to_tensor(self.device)], RECEIVER, 0), deadline, False)

    def _announce(self, values: list[int]) -> None:
        announce_header(self._handshake.store, self._handshake.conn_id, self._seq, values)
        self._seq += 1

    def send(self, header: TransferHeader, part: MessagePart, payload: torch.Tensor, deadline: float) -> None:
        # payload: [nbytes] uint8, a view of a staging buffer
        wait_work(self._group.send([payload], RECEIVER, 0), deadline, self._cuda)

    def flush(self, deadline: float) -> None:
        """Every send so far has completed (CUDA: poll an event after them, bounded by the deadline)."""
        if self._cuda:
            event = torch.cuda.Event()
            event.record()
            wait_event(event, deadline, "NCCL send")

    def close(self, graceful: bool) -> None:
        group, self._group = self._group, None
        if group is None:
            return
        with contextlib.suppress(Exception):
            if graceful and self._cuda:
                self._announce(CLOSE_MARKER)
            elif graceful:
                close = torch.tensor(CLOSE_MARKER, dtype=torch.int64, device=self.device)
                wait_work(group.send([close], RECEIVER, 0), time.monotonic() + 1.0, False)
            self._handshake.mark_closed()
        if self._cuda:  # every send has completed (flush) or is abandoned: nothing left to wait for
            with contextlib.suppress(Exception):
                group.abort()
