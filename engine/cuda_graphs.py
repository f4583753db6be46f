"""Decode steps replayed from CUDA graphs, one per batch-size bucket.

A decode-only step of B sequences is padded to the smallest captured bucket >= B and
replayed: one launch instead of hundreds, so the GPU never waits on Python. Padding rows
write their K/V into a scratch block no request owns, and their outputs are dropped.
The step arrives on the device already (one pinned copy); it is copied into the graph's
static buffers on the device, and nothing in the replay syncs with the host.
"""
from __future__ import annotations

import torch

from pdserve.engine.layers.attention import AttentionMetadata
from pdserve.engine.step import StepBatch


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class CudaGraphRunner:
    def __init__(self, model, max_num_seqs: int, max_blocks_per_seq: int, scratch_block: int, block_size: int,
                 device: torch.device):
        self.model, self.device = model, device
        self.buckets = bucket_sizes(max_num_seqs)
        self.max_blocks = max_blocks_per_seq
        self.scratch_slot = scratch_block * block_size
        n = self.buckets[-1]
        with torch.device(device):
            self.input_ids = torch.zeros(n, dtype=torch.int64)
            self.positions = torch.zeros(n, dtype=torch.int64)
            self.slot_mapping = torch.full((n,), self.scratch_slot, dtype=torch.int64)
            self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32)
            self.seq_lens = torch.ones(n, dtype=torch.int32)
            self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _forward(self, bs: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.query_start_loc[: bs + 1],
                                 self.seq_lens[:bs], decode_only=True)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            self._forward(bs)  # compile kernels and settle allocations outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, batch: StepBatch) -> bool:
        return (batch.decode_only and len(batch.logits_indices) == len(batch.seq_lens) <= self.buckets[-1]
                and batch.block_tables.shape[1] <= self.max_blocks)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only step (every row is sampled); `batch` is on the device."""
        B, width = len(batch.seq_lens), batch.block_tables.shape[1]
        bs = next(s for s in self.buckets if s >= B)
        self.input_ids[:B].copy_(batch.input_ids)
        self.positions[:B].copy_(batch.positions)
        self.slot_mapping[:B].copy_(batch.slot_mapping)
        self.slot_mapping[B:bs].fill_(self.scratch_slot)
        self.seq_lens[:B].copy_(batch.seq_lens)
        self.seq_lens[B:bs].fill_(1)
        self.block_tables[:B, :width].copy_(batch.block_tables)
        self.graphs[bs].replay()
        return self.logits[bs][:B]
