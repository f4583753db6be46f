"""Same-node KV transport: the prefill rank writes its blocks straight into the decode rank's cache.

Each receiving rank shares its cache once, through a CUDA IPC handle handed over at the handshake with its
layout; a sender maps it and copies blocks from its own cache into the destination blocks with the block
copy kernel (`kernels.ops.copy_blocks`), layer by layer as they are saved, on its pair thread's side stream
and a bounded share of the SMs (`copy_sm_fraction`). No process group, no staging buffer. A TCP connection
per pair carries the handshake and three small messages per transfer (length-prefixed JSON, wire.py):

    connect {layout, transfer_id}              ->  {layout, conn_id, error, cache}
    begin {transfer_id, num_blocks, heads}     ->  {block_ids} | {error}
    end {transfer_id, ok, num_bytes}              (no reply; sent once the copies ran on the device)

The receiver marks a transfer DONE only at its `end` (ok), which the sender sends after its host saw the
copy stream's event complete. From `begin` on, the destination blocks stay out of the receiver's pool
(`Incoming.launching`) until that transfer's `end` or the connection's loss, so a transfer failed at the
receiver's deadline never hands back blocks a sender may still write. A lost connection (the peer died or
closed) fails the transfers it carried; a sender whose receiver went away drops the mapping before
anything else and never writes it again.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from pdserve.errors import TransferError
from pdserve.kernels import ops
from pdserve.kv_transfer.layout import KVLayout, check_match
from pdserve.kv_transfer.messages import Endpoint, MessagePart, TransferConfig, TransferHeader, TransportKind
from pdserve.kv_transfer.place import local_place, writes_into
from pdserve.kv_transfer.share import open_cache, share_cache, unshare_cache
from pdserve.kv_transfer.staging import device_index
from pdserve.kv_transfer.transport import Ingest, Link
from pdserve.kv_transfer.wire import peer_closed, recv_msg, send_msg

CLOSE_WAIT_S = 5.0  # how long closing a link waits for its copies before it lets the receiver reuse blocks


class IpcIngest(Ingest):
    """Receiving rank's end: shares its cache once, accepts pairs, and serves each on a thread of its own."""

    def __init__(self, receiver, host: str):
        self.receiver = receiver
        self._share = share_cache(receiver.kv_cache)
        self._listener = socket.create_server((host, 0))
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[int, socket.socket] = {}
        port = self._listener.getsockname()[1]
        self.endpoint = Endpoint(TransportKind.IPC, host, port, local_place(receiver.kv_cache.device))
        threading.Thread(target=self._accept, name=f"kv-ipc-accept-{port}", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(sock,), name="kv-ipc-pair", daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        """One pair: the handshake, then each transfer's begin and end, until the sender closes it, it idles
        past twice the idle timeout, or it breaks."""
        config, conn_id, reason = self.receiver.config, None, "the sender closed the connection"
        begun: dict[int, tuple] = {}  # transfer id -> (Incoming, TransferHeader): blocks held for the sender
        try:
            conn_id = self._handshake(sock, recv_msg(sock, time.monotonic() + config.connect_timeout_s))
            while conn_id is not None and not self._closed.is_set():
                msg = recv_msg(sock, time.monotonic() + 2 * config.idle_timeout_s)
                if msg["op"] == "close":
                    break
                if msg["op"] == "begin":
                    self._begin(sock, conn_id, msg, begun)
                elif msg["op"] == "end":
                    self._end(msg, begun)
                else:
                    raise TransferError(f"unknown message {msg['op']!r}")
        except (TransferError, OSError, ValueError, KeyError) as e:
            reason = e.message if isinstance(e, TransferError) else f"{type(e).__name__}: {e}"
        finally:
            # NOTE: once the connection is gone no write of this sender is still to come (it waits for its
            # copies before it closes; a dead process's work ends with it), so the held blocks may go back.
            # Only the transfers this sender had begun and not ended fail: others it carried may still get
            # their other parts from other senders (resharding), and ended ones are its no longer.
            for inc, _ in begun.values():
                self._unhold(inc, 0)
                self.receiver.fail_part(inc, f"connection to the sender was lost: {reason}")
            with self._lock:
                self._conns.pop(conn_id, None)
            sock.close()

    def _handshake(self, sock: socket.socket, msg: dict) -> int | None:
        """Check the sender's layout; reply with ours, and our cache when they agree. The pair's id, or None."""
        local = self.receiver.layout
        try:
            check_match(local, KVLayout.from_dict(msg["layout"]), "receiver", "sender")
        except TransferError as e:
            self.receiver.reject(msg["transfer_id"], e.message)
            send_msg(sock, {"layout": local.to_dict(), "conn_id": 0, "error": e.message, "cache": None})
            return None
        conn_id = self.receiver.new_conn_id()
        with self._lock:
            self._conns[conn_id] = sock
        send_msg(sock, {"layout": local.to_dict(), "conn_id": conn_id, "error": None, "cache": self._share})
        return conn_id

    def _begin(self, sock: socket.socket, conn_id: int, msg: dict, begun: dict) -> None:
        """Hand the sender the transfer's destination blocks, and hold them until its end."""
        n, heads = msg["num_blocks"], tuple(msg["heads"])
        header = TransferHeader(msg["transfer_id"], n, heads, self.receiver.layout.num_layers, n)
        try:
            inc = self.receiver.open_part(conn_id, header)  # waits (bounded) for expect()
            self.receiver.hold(inc)
        except TransferError as e:
            send_msg(sock, {"error": e.message})
            return
        begun[header.transfer_id] = (inc, header)
        send_msg(sock, {"block_ids": inc.block_ids})

    def _end(self, msg: dict, begun: dict) -> None:
        inc, header = begun.pop(msg["transfer_id"])
        self._unhold(inc, msg["num_bytes"] if msg["ok"] else 0)
        if msg["ok"]:
            whole = MessagePart((0, self.receiver.layout.num_layers), (0, header.num_blocks))
            self.receiver.landed(inc, header, [whole])
        else:
            self.receiver.fail_part(inc, f"the sender gave up: {msg.get('error')}")

    def _unhold(self, inc, num_bytes: int) -> None:
        with inc.lock:
            inc.launching -= 1
            inc.num_bytes += num_bytes

    def drop_conn(self, conn_id: int) -> None:
        """Nothing: the pair carries no state a failed transfer could poison, and closing it would not stop a
        sender's copies (the blocks come back at that transfer's end, or when the connection is lost)."""

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        unshare_cache(self._share)


class IpcLink(Link):
    """Sending rank's end of one pair: the receiver's cache mapped into this process, and the control
    connection. Transfers are written with `write` (a direct link: no staging, no messages)."""

    direct = True

    def __init__(self, endpoint: Endpoint, device: torch.device, config: TransferConfig):
        self.endpoint, self.device, self.config = endpoint, device, config
        self._sock: socket.socket | None = None
        self._cache: torch.Tensor | None = None  # the receiver's [L, 2, N, H_remote, Bs, D], mapped
        self._remote: KVLayout | None = None
        self._current: TransferHeader | None = None  # begun, not yet ended
        self._dst_index: torch.Tensor | None = None  # [n] the current transfer's destination blocks
        self._num_bytes = 0
        self._stream: torch.cuda.Stream | None = None  # where the current transfer's copies run
        self._deadline = 0.0  # the current transfer's

    def connect(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        target = writes_into(self.device, self.endpoint.place)
        if target is None:
            raise TransferError(f"{self.device} cannot write into the GPU of the receiver at "
                                f"{self.endpoint.host}:{self.endpoint.port}")
        self._sock = socket.create_connection((self.endpoint.host, self.endpoint.port),
                                              timeout=max(deadline - time.monotonic(), 0.001))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        send_msg(self._sock, {"op": "connect", "layout": local.to_dict(), "transfer_id": transfer_id})
        reply = recv_msg(self._sock, deadline)
        remote = KVLayout.from_dict(reply["layout"])
        if reply["error"]:
            raise TransferError(reply["error"])
        check_match(local, remote, "sender", "receiver")
        cache = open_cache(reply["cache"], target)
        want = (remote.num_layers, 2, cache.shape[2], remote.num_local_heads, remote.block_size, remote.head_dim)
        if tuple(cache.shape) != want:
            raise TransferError(f"receiver's shared cache is {tuple(cache.shape)}, its layout says {want}")
        self._cache, self._remote = cache, remote
        return remote

    def is_open(self) -> bool:
        return self._sock is not None and not peer_closed(self._sock)

    def begin(self, header: TransferHeader, deadline: float, on_device: torch.Tensor | None) -> None:
        """Announce the transfer. The receiver's answer (its destination blocks) is read by the first write,
        so that the caller stages its own block ids meanwhile (bounded by `deadline`)."""
        if peer_closed(self._sock):  # a dead receiver's memory is never written
            raise TransferError("the receiver closed the connection")
        send_msg(self._sock, {"op": "begin", "transfer_id": header.transfer_id, "num_blocks": header.num_blocks,
                              "heads": list(header.heads)})
        self._current, self._deadline, self._num_bytes, self._dst_index = header, deadline, 0, None
        self._stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _destination(self) -> torch.Tensor:
        """[n] the current transfer's destination blocks on this device, from the receiver's answer."""
        if self._dst_index is None:
            reply = recv_msg(self._sock, self._deadline)
            if "error" in reply:
                self._current = None  # the receiver holds nothing for it
                raise TransferError(reply["error"])
            if len(reply["block_ids"]) != self._current.num_blocks:
                raise TransferError(f"receiver gave {len(reply['block_ids'])} blocks for {self._current.num_blocks}")
            self._dst_index = device_index(reply["block_ids"], self.device)
        return self._dst_index

    def send(self, header: TransferHeader, part: MessagePart, payload: torch.Tensor, deadline: float) -> None:
        """Never called: a direct link writes the blocks itself (`write`); nothing is staged or sent."""
        raise NotImplementedError("an IPC link writes blocks, it sends no messages")

    def write(self, layers: tuple[int, int], src_cache: torch.Tensor, src_index: torch.Tensor,
              src_heads: tuple[int, int], num_programs: int | None) -> int:
        """Enqueue (on the current stream) the copy of these layers of the current transfer's blocks, heads
        `src_heads` of this rank's cache, into the receiver's blocks; returns the bytes it moves."""
        dst_index = self._destination()
        if peer_closed(self._sock):  # a dead receiver's memory is never written
            raise TransferError("the receiver closed the connection")
        hs = self._remote.heads[0]
        dst_heads = (self._current.heads[0] - hs, self._current.heads[1] - hs)
        ops.copy_blocks(src_cache, src_index, self._cache, dst_index, layers, src_heads, dst_heads, num_programs)
        shape = self._cache.shape
        num_bytes = ((layers[1] - layers[0]) * 2 * len(src_index) * (src_heads[1] - src_heads[0]) * shape[4]
                     * shape[5] * self._cache.element_size())
        self._num_bytes += num_bytes
        return num_bytes

    def flush(self, deadline: float, after: torch.cuda.Event | None = None) -> None:
        """Wait (bounded) for the current transfer's copies to run on the device, then tell the receiver."""
        self._destination()  # its answer is read even if nothing was written
        if not self._copies_done(deadline):
            raise TransferError("the copies into the receiver's cache did not complete within the deadline")
        header, self._current = self._current, None
        send_msg(self._sock, {"op": "end", "transfer_id": header.transfer_id, "ok": True,
                              "num_bytes": self._num_bytes})

    def _copies_done(self, deadline: float) -> bool:
        if self._stream is None:
            return True
        done = torch.cuda.Event()
        done.record(self._stream)
        while not done.query():  # yields the GIL each turn; the copies of one transfer take milliseconds
            if time.monotonic() > deadline:
                return False
            time.sleep(0)
        return True

    def close(self, graceful: bool) -> None:
        header, self._current = self._current, None
        copies_done = header is None or self._copies_done(time.monotonic() + CLOSE_WAIT_S)
        self._cache = None  # drop the mapping first: nothing writes it again
        if self._sock is None:
            return
        with contextlib.suppress(OSError):
            if header is not None and copies_done:
                send_msg(self._sock, {"op": "end", "transfer_id": header.transfer_id, "ok": False,
                                      "num_bytes": 0, "error": "the transfer failed on the sending side"})
            if graceful:
                send_msg(self._sock, {"op": "close"})
        self._sock.close()
