"""The plain per-step input handed to the model: tensors only, no request objects.

Rank 0 builds it from the scheduler's plan; under tensor parallelism it travels to the
other ranks as one flat int64 tensor (`pack` / `unpack`), never pickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pdserve.engine.layers.attention import AttentionMetadata
from pdserve.engine.scheduler import SchedulerOutput

_HEADER = 7  # T, S, max_blocks, N, decode_only, P, num_prev


@dataclass
class StepBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [S, max_blocks] int32
    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    logits_indices: torch.Tensor  # [N] int64: rows of the hidden states that get sampled
    decode_only: bool
    # Asynchronous scheduling: input_ids[prev_rows[i]] is the token the previous step sampled in its row
    # prev_src[i] (of num_prev rows); the host does not know it yet, the device does (ModelRunner.forward).
    prev_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [P] int64
    prev_src: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [P] int64
    num_prev: int = 0
    # The packed form, made at most once (a step's fields never change once it is packed): rank 0
    # packs for its peers and for its own upload, and a peer uploads exactly what it received.
    packed: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, plan: SchedulerOutput, block_size: int, num_prev: int = 0) -> StepBatch:
        """The step of `plan`; `num_prev`: rows the previous step sampled, where pending tokens come from."""
        # NOTE: per request only list appends; positions, slots and the padded block tables are computed
        # with numpy over the whole step, from each request's block table kept as numpy (converting every
        # block of every table from Python ints costs milliseconds a step at large batches: docs/benchmarks.md).
        ids, starts, counts, seq_lens, logit_rows, tables = [], [], [], [], [], []
        prev_rows, prev_src = [], []
        total = 0
        for req, n in plan.scheduled:
            start = req.num_computed_tokens
            ids += req.token_ids_range(start, start + n)
            starts.append(start)
            counts.append(n)
            seq_lens.append(start + n)
            tables.append(req.block_table_array())
            total += n
            if start + n == req.num_tokens:  # caught up: this step samples its next token
                logit_rows.append(total - 1)
                if req.num_pending:  # its last input token was sampled by the previous step, not read yet
                    assert n == 1 and 0 <= req.pending_row < num_prev, (n, req.pending_row, num_prev)
                    prev_rows.append(total - 1)
                    prev_src.append(req.pending_row)
        S = len(tables)
        counts_np = np.array(counts, dtype=np.int64)
        q_start = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(counts_np, out=q_start[1:])
        seq = np.repeat(np.arange(S), counts_np)  # [T]: the step's sequence of each token
        pos = np.arange(total, dtype=np.int64) + (np.array(starts, dtype=np.int64) - q_start[:-1])[seq]
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=S)
        width = int(lens.max())
        flat = np.concatenate(tables)
        padded = np.zeros((S, width), dtype=np.int32)
        offsets = np.zeros(S, dtype=np.int64)
        np.cumsum(lens[:-1], out=offsets[1:])
        rows = np.repeat(np.arange(S), lens)
        padded[rows, np.arange(flat.size) - offsets[rows]] = flat
        slots = padded[seq, pos // block_size].astype(np.int64) * block_size + pos % block_size
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.from_numpy(pos),
            slot_mapping=torch.from_numpy(slots),
            block_tables=torch.from_numpy(padded),
            query_start_loc=torch.from_numpy(q_start.astype(np.int32)),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            logits_indices=torch.tensor(logit_rows, dtype=torch.int64),
            decode_only=total == S,
            prev_rows=torch.tensor(prev_rows, dtype=torch.int64),
            prev_src=torch.tensor(prev_src, dtype=torch.int64),
            num_prev=num_prev if prev_rows else 0,
        )

    def attention_metadata(self) -> AttentionMetadata:
        return AttentionMetadata(
            self.slot_mapping, self.block_tables, self.query_start_loc, self.seq_lens, self.decode_only
        )

    def to(self, device: torch.device, staging: PinnedStaging | None = None) -> StepBatch:
        """The same step on `device`: with `staging`, one pinned non-blocking copy of the packed step."""
        if staging is None or device.type != "cuda":
            moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
            return StepBatch(**moved, decode_only=self.decode_only, num_prev=self.num_prev)
        flat = staging.upload(self.pack())
        return StepBatch.unpack(flat, header=self.header())

    def header(self) -> list[int]:
        S, M = self.block_tables.shape
        return [len(self.input_ids), S, M, len(self.logits_indices), int(self.decode_only), len(self.prev_rows),
                self.num_prev]

    def pack(self) -> torch.Tensor:
        """One flat int64 tensor: a header of sizes, then every field."""
        if self.packed is None:
            parts = [torch.tensor(self.header(), dtype=torch.int64), self.input_ids, self.positions,
                     self.slot_mapping, self.block_tables.flatten(), self.query_start_loc, self.seq_lens,
                     self.logits_indices, self.prev_rows, self.prev_src]
            self.packed = torch.cat([p.to(torch.int64) for p in parts])
        return self.packed

    @classmethod
    def unpack(cls, flat: torch.Tensor, header: list[int] | None = None) -> StepBatch:
        """Inverse of `pack`. With `header` known on the host, a device `flat` is read without a sync."""
        T, S, M, N, decode_only, P, num_prev = header if header is not None else flat[:_HEADER].tolist()
        sizes = [T, T, T, S * M, S + 1, S, N, P, P]
        ids, pos, slots, tables, q_start, seq_lens, rows, prev_rows, prev_src = flat[_HEADER:].split(sizes)
        return cls(ids, pos, slots, tables.view(S, M).int(), q_start.int(), seq_lens.int(), rows,
                   bool(decode_only), prev_rows, prev_src, num_prev, packed=flat)

    @staticmethod
    def max_packed_size(max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> int:
        """Words of the largest packed step a scheduler with these limits can produce."""
        return _HEADER + 3 * max_tokens + max_seqs * (max_blocks_per_seq + 5) + 1


class PinnedStaging:
    """A pinned host buffer and a device buffer for moving packed steps in one non-blocking copy."""

    def __init__(self, capacity: int, device: torch.device):
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=True)
        self.device_buf = torch.empty(capacity, dtype=torch.int64, device=device)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def upload(self, flat: torch.Tensor) -> torch.Tensor:
        n = flat.numel()
        assert n <= self.host.numel(), f"step of {n} words exceeds the staging buffer's {self.host.numel()}"
        self.copied.synchronize()  # the previous step's copy must be done before the host buffer is reused
        self.host[:n].copy_(flat)
        out = self.device_buf[:n]
        out.copy_(self.host[:n], non_blocking=True)
        self.copied.record()
        return out
