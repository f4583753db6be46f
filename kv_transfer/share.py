"""Sharing a receiving rank's KV cache with the senders of its node: a CUDA IPC handle, as plain data.

The handle is torch's own (`torch.multiprocessing.reductions.reduce_tensor`, the mechanism behind
torch.multiprocessing's CUDA sharing, with its reference counting), written as JSON-safe fields so that it
travels in the handshake with the layout. A CPU cache is shared within its own process only (in-process
pairs and tests): another process that gets such a share refuses it.
"""
from __future__ import annotations

import itertools
import os
import threading

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from pdserve.errors import TransferError

_local: dict[int, torch.Tensor] = {}  # CPU caches shared in this process, by key
_keys = itertools.count(1)
_lock = threading.Lock()


def share_cache(kv_cache: torch.Tensor) -> dict:
    """A description of `kv_cache` that open_cache turns back into the same memory (once per cache)."""
    if not kv_cache.is_cuda:
        with _lock:
            key = next(_keys)
            _local[key] = kv_cache
        return {"kind": "local", "pid": os.getpid(), "key": key}
    _, args = reduce_tensor(kv_cache)
    (_, size, stride, offset, _, dtype, _, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return {"kind": "cuda", "pid": os.getpid(), "size": list(size), "stride": list(stride), "offset": offset,
            "dtype": str(dtype).removeprefix("torch."), "handle": handle.hex(), "storage_bytes": storage_bytes,
            "storage_offset": storage_offset, "ref_handle": ref_handle.hex(), "ref_offset": ref_offset,
            "event_handle": event_handle.hex() if event_handle else None, "event_sync": event_sync}


def unshare_cache(share: dict) -> None:
    """Forget a CPU share (CUDA shares end with the cache's last user)."""
    if share["kind"] == "local":
        with _lock:
            _local.pop(share["key"], None)


def open_cache(share: dict, device: torch.device) -> torch.Tensor:
    """The shared cache, mapped into this process on `device` (this process's index of the sharer's GPU)."""
    if share["kind"] == "local":
        if share["pid"] != os.getpid():
            raise TransferError(f"the receiver's cache is in the host memory of process {share['pid']}: the "
                                f"ipc transport needs a CUDA cache there")
        with _lock:
            cache = _local.get(share["key"])
        if cache is None:
            raise TransferError("the receiver's cache is no longer shared")
        return cache
    if device.type != "cuda":
        raise TransferError("the receiver's cache is on a GPU and this rank's is not")
    event = share["event_handle"]
    return rebuild_cuda_tensor(
        torch.Tensor, tuple(share["size"]), tuple(share["stride"]), share["offset"], torch.UntypedStorage,
        getattr(torch, share["dtype"]), device.index, bytes.fromhex(share["handle"]), share["storage_bytes"],
        share["storage_offset"], False, bytes.fromhex(share["ref_handle"]), share["ref_offset"],
        bytes.fromhex(event) if event else None, share["event_sync"])
