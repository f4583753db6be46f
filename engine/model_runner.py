"""Owns one rank's model and KV cache; turns a `StepBatch` into logits, and logits into tokens."""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pdserve.config import DeploymentConfig
from pdserve.engine.cuda_graphs import CudaGraphRunner
from pdserve.engine.loader import build_model
from pdserve.engine.memory import host_memory_available
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.model_shape import check_max_model_len
from pdserve.engine.parallel import TPGroup
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, SamplerOutput, SamplingBatch
from pdserve.engine.step import PinnedStaging, StepBatch
from pdserve.errors import ConfigError

log = logging.getLogger(__name__)


def wants_cuda(config: DeploymentConfig) -> bool:
    """`device: cuda`, or `auto` where this process sees a CUDA device."""
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


def pick_device(config: DeploymentConfig) -> torch.device:
    if not wants_cuda(config):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for, but no CUDA device is visible")
    return torch.device("cuda", torch.cuda.current_device())


class ModelRunner:
    def __init__(self, config: DeploymentConfig, spec: ModelSpec, tp: TPGroup, device: torch.device):
        self.config, self.spec, self.tp, self.device = config, spec, tp, device
        self.dtype = spec.resolve_dtype(config.dtype)
        self.graphs: CudaGraphRunner | None = None  # captured last, once the cache exists
        self.staging: PinnedStaging | None = None
        self.block_size = config.block_size
        check_max_model_len(spec, config.max_model_len)
        self.max_positions = max_positions = config.max_model_len or spec.max_position_embeddings
        self.model = build_model(spec, tp, self.dtype, device, max_positions, config.load_format, config.seed)
        attn = self.model.attention_layers()[0]
        self.num_kv_heads = attn.num_kv_heads  # local to this rank
        self.num_blocks = self._agree_on_min(self._num_kv_blocks())
        # [L, 2, num_blocks + 1, Hkv_local, block_size, D]: head-major blocks, one view per layer.
        # The extra last block is scratch for CUDA-graph padding rows; the block pool never hands it out.
        self.kv_cache = torch.zeros(
            spec.num_layers, 2, self.num_blocks + 1, self.num_kv_heads, self.block_size, spec.head_dim,
            dtype=self.dtype, device=device,
        )
        for i, layer in enumerate(self.model.attention_layers()):
            layer.kv_cache = self.kv_cache[i]
        self.max_model_len = self._max_model_len(max_positions)
        self.sampler = Sampler()
        max_blocks = -(-self.max_model_len // self.block_size)  # the widest block table a step can carry
        if device.type == "cuda":
            size = StepBatch.max_packed_size(config.max_num_batched_tokens, config.max_num_seqs, max_blocks)
            self.staging = PinnedStaging(size, device)
        if device.type == "cuda" and config.enable_cuda_graphs:
            self.graphs = CudaGraphRunner(self.model, config.max_num_seqs, max_blocks, self.num_blocks,
                                          self.block_size, device)

    def block_bytes(self) -> int:
        return 2 * self.spec.num_layers * self.num_kv_heads * self.block_size * self.spec.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self._check_fits(self.config.num_kv_blocks, "num_kv_blocks")
        if self.device.type == "cpu":
            return self._check_fits(max(1, int(self.config.cpu_kv_cache_gib * 2**30) // self.block_bytes()),
                                    "cpu_kv_cache_gib")
        activations = self._profile_activation_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        # NOTE: this process's own usage (what its allocator holds: weights, buffers), not total - free:
        # another worker may share the GPU (one-GPU disaggregation) and holds its own share. Never more than
        # what is free now, whatever the share says.
        used = torch.cuda.memory_reserved(self.device)
        budget = min(total * self.config.gpu_memory_utilization - used, free) - activations
        if budget < self.block_bytes():
            raise ConfigError(
                f"gpu_memory_utilization: {self.config.gpu_memory_utilization} leaves no room for the KV cache "
                f"after weights and activations ({used / 2**30:.1f} GiB used by this worker, "
                f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f})"
            )
        return int(budget // self.block_bytes()) - 1  # one block is the CUDA-graph scratch block

    def _check_fits(self, num_blocks: int, field: str) -> int:
        """Before the cache is allocated: one larger than the memory left would fail half-built, or get the
        process killed."""
        need = (num_blocks + 1) * self.block_bytes()  # + the CUDA-graph scratch block
        if self.device.type == "cpu":
            where, free = "this machine has", host_memory_available()
        else:
            where, free = f"{self.device} has", torch.cuda.mem_get_info(self.device)[0]
        if need > free:
            raise ConfigError(f"{field}: the KV cache needs {need / 2**30:.1f} GiB; {where} {free / 2**30:.1f} GiB "
                              f"available")
        return num_blocks

    def _agree_on_min(self, n: int) -> int:
        """Every rank of a gang must size its cache alike: take the smallest."""
        if self.tp.size == 1:
            return n
        t = torch.tensor([n], device=self.device)
        torch.distributed.all_reduce(t, torch.distributed.ReduceOp.MIN, group=self.tp.group)
        return int(t.item())

    def _profile_activation_bytes(self) -> int:
        """Peak memory of one forward over a full token budget, through a one-block scratch cache."""
        T = self.config.max_num_batched_tokens
        scratch = torch.zeros(2, 1, self.num_kv_heads, self.block_size, self.spec.head_dim,
                              dtype=self.dtype, device=self.device)
        for layer in self.model.attention_layers():
            layer.kv_cache = scratch
        blocks = -(-T // self.block_size)
        batch = StepBatch(
            # NOTE: a budget above max_model_len still runs whole: positions wrap inside the rotary table
            input_ids=torch.zeros(T, dtype=torch.int64), positions=torch.arange(T) % self.max_positions,
            slot_mapping=torch.arange(T) % self.block_size,
            block_tables=torch.zeros(1, blocks, dtype=torch.int32),
            query_start_loc=torch.tensor([0, T], dtype=torch.int32), seq_lens=torch.tensor([T], dtype=torch.int32),
            logits_indices=torch.tensor([T - 1]), decode_only=False,
        )
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.forward(batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _max_model_len(self, wanted: int) -> int:
        capacity = self.num_blocks * self.block_size
        if wanted <= capacity:
            return wanted
        if self.config.max_model_len is not None:
            raise ConfigError(
                f"max_model_len: {wanted} tokens do not fit the KV cache ({capacity} tokens); "
                f"lower it or give the cache more memory"
            )
        log.info("max_model_len capped at the KV cache's capacity: %d tokens", capacity)
        return capacity

    @torch.inference_mode()
    def forward(self, batch: StepBatch, prev_sampled: torch.Tensor | None = None,
                layer_hook: Callable[[int], None] | None = None) -> torch.Tensor:
        """All ranks: run the model over the step; return fp32 logits [N, vocab] for the sampled rows.

        `prev_sampled` (rank 0, asynchronous scheduling): the previous step's sampled ids on the device, where
        the step's pending input tokens (batch.prev_rows) come from; rank 0 broadcasts them to the others.
        `layer_hook(i)`: called as each layer's KV store is enqueued (steps that ship KV; never graphed).
        """
        batch = batch.to(self.device, self.staging)
        if len(batch.prev_rows):
            batch.input_ids = self._fill_pending(batch, prev_sampled)
        if layer_hook is None and self.graphs is not None and self.graphs.can_run(batch):  # shapes only: no sync
            return self.graphs.run(batch)
        hidden = self.model(batch.input_ids, batch.positions, batch.attention_metadata(), layer_hook)
        return self.model.compute_logits(hidden[batch.logits_indices])

    def _fill_pending(self, batch: StepBatch, prev_sampled: torch.Tensor | None) -> torch.Tensor:
        """The step's input ids with the previous step's sampled tokens in their rows, on the device.

        NOTE: under TP only rank 0 samples; the others get its sampled ids by one broadcast (stream-ordered
        on NCCL: no host waits), as small as the batch.
        """
        if self.tp.rank == 0:
            assert prev_sampled is not None and prev_sampled.shape == (batch.num_prev,), "previous step's ids"
            sampled = prev_sampled
        else:
            sampled = torch.empty(batch.num_prev, dtype=torch.int64, device=self.device)
        self.tp.broadcast_from_first(sampled)
        return batch.input_ids.index_put((batch.prev_rows,), sampled[batch.prev_src])

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Rank 0: one token for each request, in the order of the logits' rows."""
        sb = SamplingBatch.build(
            [r.sampling_params for r in requests],
            [r.prompt_token_ids for r in requests],
            [r.output_token_ids for r in requests],
            [r.generator for r in requests],
            self.spec.vocab_size,
            self.device,
        )
        return self.sampler(logits, sb)
