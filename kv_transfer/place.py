"""Where a rank runs (node, GPU), and which transport kind reaches a receiving rank from a sender's place."""
from __future__ import annotations

import functools
import socket
from pathlib import Path

import torch

from pdserve.errors import TransferError
from pdserve.kv_transfer.messages import Endpoint, Place, TransportKind

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def node_id() -> str:
    """This host's name and boot id: two processes share a node exactly when theirs are equal (a name alone
    can repeat across containers; the boot id changes with every boot)."""
    boot = _BOOT_ID.read_text().strip() if _BOOT_ID.exists() else ""
    return f"{socket.gethostname()}/{boot}"


def gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def local_place(device: torch.device) -> Place:
    """The place of a rank whose cache lives on `device`."""
    return Place(node_id(), gpu_uuid(device) if device.type == "cuda" else None)


def visible_index(uuid: str) -> int | None:
    """This process's index of the GPU with this UUID; None when it is not visible here."""
    for index in range(torch.cuda.device_count()):
        if gpu_uuid(torch.device("cuda", index)) == uuid:
            return index
    return None


def writes_into(device: torch.device, place: Place | None) -> torch.device | None:
    """The device (in this process's numbering) through which a rank on `device` writes the cache of a rank
    at `place`: the same GPU, or a peer this process sees and may access; None when it cannot (another
    node, a GPU not visible here or without peer access, CPU and GPU mixed). Host memory to host memory on
    one node is allowed here and refused at the handshake unless both ranks are one process (share.py)."""
    if place is None or place.node != node_id() or (device.type == "cuda") != (place.gpu is not None):
        return None
    if device.type != "cuda":
        return device
    index = visible_index(place.gpu)
    if index is None:
        return None
    if index != device.index and not torch.cuda.can_device_access_peer(device.index, index):
        return None
    return torch.device("cuda", index)


def choose(endpoint: Endpoint, device: torch.device) -> Endpoint:
    """The first endpoint of `endpoint`'s fallback chain that a sender on `device` reaches: an IPC endpoint
    only from a GPU that writes into the receiver's (writes_into); every other kind from anywhere."""
    chosen = endpoint
    while chosen.kind is TransportKind.IPC and writes_into(device, chosen.place) is None:
        if chosen.fallback is None:
            raise TransferError(f"no transport reaches the receiving rank at {endpoint.host}:{endpoint.port} "
                             f"from {device}: IPC needs the same node and GPU access, and it offers no other")
        chosen = chosen.fallback
    return chosen
