"""Small control messages over a TCP socket: a 4-byte length, then JSON. Every read has a deadline."""
from __future__ import annotations

import json
import select
import socket
import struct
import time

from pdserve.errors import TransferError

MAX_MESSAGE = 16 << 20  # a begin reply lists a transfer's block ids; anything larger is not ours


def send_msg(sock: socket.socket, msg: dict) -> None:
    data = json.dumps(msg).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_msg(sock: socket.socket, deadline: float) -> dict:
    """The next message; TransferError when the deadline passes or the peer closes the connection."""
    (size,) = struct.unpack("!I", _recv_exact(sock, 4, deadline))
    if size > MAX_MESSAGE:
        raise TransferError(f"control message of {size} bytes exceeds {MAX_MESSAGE}")
    return json.loads(_recv_exact(sock, size, deadline))


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    chunks, left = [], size
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0:
            raise TransferError("no answer from the peer within the deadline")
        sock.settimeout(wait)
        try:
            chunk = sock.recv(left)
        except TimeoutError:
            continue  # the loop's deadline check ends it
        if not chunk:
            raise TransferError("the peer closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has closed the connection (or it broke), without blocking."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        sock.setblocking(False)
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        finally:
            sock.setblocking(True)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
