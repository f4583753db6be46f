"""A bounded pool of reusable staging buffers: blocks are gathered into one and sent as one message."""
from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass

import torch

from pdserve.errors import TransferError


@dataclass
class StagingBuffer:
    data: torch.Tensor  # [capacity] uint8, allocated once
    # NOTE: on CUDA a buffer goes back to the pool as soon as its last use is enqueued; the next user's
    # stream waits on this event instead of the host waiting (the caching allocator's trick).
    ready: torch.cuda.Event | None = None

    def view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        assert nbytes <= self.data.numel(), f"message of {nbytes} bytes exceeds staging {self.data.numel()}"
        return self.data[:nbytes].view(dtype).view(shape)


class StagingPool:
    """num_buffers buffers of buffer_bytes each on one device; acquire waits (bounded) for a free one."""

    def __init__(self, num_buffers: int, buffer_bytes: int, device: torch.device):
        self.buffer_bytes = buffer_bytes
        self.device = torch.device(device)
        pin = self.device.type == "cpu" and torch.cuda.is_available()  # host side of a GPU's gRPC path
        # NOTE: first in, first out, so consecutive messages use different buffers: on CUDA the gather of the
        # next message overlaps the send of the previous one instead of waiting for it.
        self.buffers = [StagingBuffer(torch.empty(buffer_bytes, dtype=torch.uint8, device=self.device, pin_memory=pin))
                        for _ in range(num_buffers)]
        self._free = collections.deque(self.buffers)
        self._cond = threading.Condition()

    def acquire(self, deadline: float | None) -> StagingBuffer | None:
        """A free buffer, waiting (bounded) for one; deadline None: only if one is free now (else None).

        NOTE: a caller that holds buffers it alone gives back must not wait here (deadline None): two such
        callers waiting for each other's buffers would wait until their deadlines.
        """
        with self._cond:
            while not self._free:
                if deadline is None:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError("timed out waiting for a free KV staging buffer")
                self._cond.wait(left)
            buf = self._free.popleft()
        if buf.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(buf.ready)
        return buf

    def acquire_all(self, deadline: float) -> list[StagingBuffer]:
        """Every buffer, in `buffers` order, taken at once (no caller holds some while waiting for the rest);
        the current stream waits until each one's last use ran."""
        with self._cond:
            while len(self._free) < len(self.buffers):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferError("timed out waiting for the KV staging buffers")
                self._cond.wait(left)
            self._free.clear()
        for buf in self.buffers:
            if buf.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(buf.ready)
        return list(self.buffers)

    def release(self, buf: StagingBuffer, ready: torch.cuda.Event | None = None) -> None:
        """Give back a buffer whose uses are all enqueued: on the current stream, or (CUDA) before `ready`,
        an event of another stream (a send's completion); on CPU they are done."""
        if self.device.type == "cuda":
            if ready is None:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
            buf.ready = ready
        with self._cond:
            self._free.append(buf)
            self._cond.notify()


def copy_programs(device: torch.device, sm_fraction: float) -> int | None:
    """How many programs a transfer's gather or scatter runs on (block_copy's num_programs): that fraction of
    the GPU's SMs; None (one program per block and layer) off CUDA or at a fraction of 1 or more."""
    if device.type != "cuda" or sm_fraction >= 1.0:
        return None
    return max(1, int(torch.cuda.get_device_properties(device).multi_processor_count * sm_fraction))


def pinned_index(ids: list[int]) -> torch.Tensor:
    """[n] int64 in pinned host memory: the host half of device_index, made ahead of time."""
    return torch.tensor(ids, dtype=torch.int64).pin_memory()


def device_index(ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """[n] int64 ids on `device`, without the host waiting for the current stream (CUDA: staged through
    pinned memory, or taken from pinned_index, and copied asynchronously; a plain torch.tensor(...,
    device=cuda) synchronizes the stream, which would hold back every receive or send posted after it)."""
    if isinstance(ids, torch.Tensor) and ids.is_pinned():
        return ids.to(device, non_blocking=True)
    index = torch.tensor(ids, dtype=torch.int64)
    if device.type != "cuda":
        return index
    return index.pin_memory().to(device, non_blocking=True)
