"""CUDA graphs of a transfer's whole message sequence on an NCCL pair: the host launches a transfer once per
side instead of once per gather, send, receive and scatter.

A pair keeps one graph per message plan (the transfer header's fields fix it), captured the first time the
plan is seen and replayed after. What a graph reads is fixed for its life: the cache, the staging pool's
buffers (a replay holds all of them), and a device buffer of block ids the pair keeps (refilled before each
replay). Graphs belong to the pair's process group: a pair torn down drops them.

NOTE: captured with capture_begin/capture_end on the pair's stream, not `torch.cuda.graph`, which
synchronizes the device first: on a decode GPU that waits for every NCCL receive posted there, forever if a
peer is gone. Capture is thread-local: other threads keep launching (and allocating) meanwhile.
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

import torch


def capture(stream: torch.cuda.Stream, enqueue: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """The work `enqueue` puts on `stream` (and on streams it forks from there and joins back), as a graph."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            enqueue()
        finally:
            graph.capture_end()
    return graph


class GraphCache:
    """A pair's graphs by plan; the least recently used one goes past `capacity`."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._graphs: collections.OrderedDict[Hashable, torch.cuda.CUDAGraph] = collections.OrderedDict()
        self.captured = 0  # graphs captured so far (for tests and metrics)

    def get(self, key: Hashable, make: Callable[[], torch.cuda.CUDAGraph]) -> torch.cuda.CUDAGraph:
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = make()
            self.captured += 1
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return graph

    def clear(self) -> None:
        self._graphs.clear()
