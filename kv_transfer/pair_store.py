"""The receiving rank's store, as both ends of a torch.distributed pair use it: the handshake (connection
numbers, layout descriptors) and the closed-pair mark. Transfer headers do not go through it: they are
messages on the pair, ahead of each transfer's data (see torch_ingest).

The receiving rank hosts a TCPStore on a port chosen at run time; see torch_dist for the groups built over it.
"""
from __future__ import annotations

import datetime
import json
import threading
import time

import torch.distributed as dist

from pdserve.errors import TransferError
from pdserve.kv_transfer.layout import KVLayout, check_match
from pdserve.kv_transfer.messages import TransferConfig


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, 0.001))


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
        """False once the receiver has torn the pair down (one store round trip)."""
        return not self.store.check([closed_key(self.conn_id)])

    def mark_closed(self) -> None:
        self.store.set(closed_key(self.conn_id), "1")


class StoreListener:
    """Receiver side: hosts the store and hands each sender's hello to `on_hello` on a listener thread, which
    also calls `on_tick` every TICK_S (the ingest looks there for pairs their senders closed)."""

    # NOTE: polls with check() rather than blocking in wait(): a blocked wait cannot be interrupted at close.
    POLL_S = 0.005
    TICK_S = 0.1

    def __init__(self, host: str, on_hello, config: TransferConfig, on_tick=None):
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=_td(config.connect_timeout_s))
        self.port = self.store.port
        self._on_hello, self._on_tick, self._config = on_hello, on_tick, config
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="kv-store-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        conn_id, since = 1, time.monotonic()
        tick = time.monotonic() + self.TICK_S
        while not self._stop.wait(self.POLL_S):
            if self._on_tick is not None and time.monotonic() > tick:
                self._on_tick()
                tick = time.monotonic() + self.TICK_S
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
