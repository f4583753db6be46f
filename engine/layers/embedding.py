"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.layers.loading import copy_into, narrow, shape
from pdserve.engine.parallel import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)  # ceil: the last shard is zero-padded
        self.vocab_start = tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        n = max(0, min(self.shard_size, shape(loaded)[0] - self.vocab_start))
        param.data[n:].zero_()
        copy_into(param[:n], narrow(loaded, 0, self.vocab_start, n))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, hidden]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> fp32 logits [N, vocab_size] on rank 0 (see TPGroup.gather_logits)
        return self.tp.gather_logits(F.linear(hidden, self.weight), self.vocab_size)
