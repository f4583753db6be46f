"""Rank 0 -> the other ranks of a gang on one node: each step through one shared-memory slot.

A step's metadata is a few KB of int64s; a socket collective per step costs a millisecond
or more of host latency in some virtual machines, which a decode step cannot afford. The
slot holds a header `[seq, command, size, writer_pid, ack_1 .. ack_{n-1}]` and the payload.
The writer waits (bounded) until every reader has acknowledged the previous step, writes
the payload, then bumps `seq` last; readers poll `seq`. On x86 stores become visible in
program order, so a reader that sees the new `seq` sees the payload written before it.
"""
from __future__ import annotations

import os
import time
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np
import torch

from pdserve.errors import WorkerFailedError

SEQ, COMMAND, SIZE, WRITER_PID, ACKS = 0, 1, 2, 3, 4
SPIN_S = 0.05  # poll without sleeping this long after the last message, then back off
LIVENESS_EVERY_S = 1.0


class StepChannel:
    def __init__(self, name: str, capacity: int, num_readers: int, create: bool):
        self.header_len = ACKS + num_readers
        nbytes = 8 * (self.header_len + capacity)
        self.shm = shared_memory.SharedMemory(name=name, create=create, size=nbytes if create else 0)
        if not create:  # the writer owns the segment; a reader exiting must not unlink it
            resource_tracker.unregister(self.shm._name, "shared_memory")
        self.created = create
        self.words = np.ndarray((self.header_len + capacity,), dtype=np.int64, buffer=self.shm.buf)
        self.capacity = capacity
        if create:
            self.words[: self.header_len] = 0
            self.words[WRITER_PID] = os.getpid()
        self.last_seen = 0

    @classmethod
    def create(cls, capacity: int, num_readers: int) -> StepChannel:
        return cls(f"pdserve-steps-{uuid.uuid4().hex[:16]}", capacity, num_readers, create=True)

    @property
    def name(self) -> str:
        return self.shm.name

    def publish(self, command: int, flat: torch.Tensor | None, timeout_s: float) -> None:
        """Writer: hand one message to every reader (waits for them to take the previous one)."""
        seq = int(self.words[SEQ])
        deadline = time.monotonic() + timeout_s
        while (self.words[ACKS : self.header_len] < seq).any():
            if time.monotonic() > deadline:
                raise WorkerFailedError(f"step channel: a rank did not take step {seq} within {timeout_s:.0f}s")
            time.sleep(0)
        size = 0 if flat is None else flat.numel()
        assert size <= self.capacity, f"step of {size} words exceeds the channel's {self.capacity}"
        if size:
            self.words[self.header_len : self.header_len + size] = flat.numpy()
        self.words[SIZE], self.words[COMMAND] = size, command
        self.words[SEQ] = seq + 1  # last: publishes the message

    def receive(self, reader: int) -> tuple[int, torch.Tensor]:
        """Reader `reader` (0-based): wait for the next message; returns (command, payload copy).

        The wait lasts while the gang is idle; it ends with an error if the writer's process
        is gone (same node: a pid check), so it never outlives rank 0.
        """
        start = last_check = time.monotonic()
        while self.words[SEQ] == self.last_seen:
            now = time.monotonic()
            if now - last_check > LIVENESS_EVERY_S:
                last_check = now
                self._check_writer_alive()
            time.sleep(0 if now - start < SPIN_S else 0.0005)
        self.last_seen += 1
        command, size = int(self.words[COMMAND]), int(self.words[SIZE])
        payload = torch.from_numpy(self.words[self.header_len : self.header_len + size].copy())
        self.words[ACKS + reader] = self.last_seen
        return command, payload

    def _check_writer_alive(self) -> None:
        try:
            os.kill(int(self.words[WRITER_PID]), 0)
        except ProcessLookupError:
            raise WorkerFailedError("step channel: rank 0's process is gone") from None

    def close(self) -> None:
        del self.words
        self.shm.close()
        if self.created:
            self.shm.unlink()
