"""Tensor-parallel group handed explicitly to every TP layer (no process-global state)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

from pdserve.kernels import gemm, norm, ops, peer_gather

log = logging.getLogger(__name__)

# Messages up to this size take the one-shot path, which beats NCCL up to a few MiB and loses past it
# (docs/benchmarks.md, "Figures behind defaults"). Decode steps up to B=256 at hidden 4096 in bf16 (2 MiB) fit.
SYMMETRIC_MAX_BYTES = 4 << 20
# The fused all-reduce + add + RMSNorm sends rows with a flag in every 8-byte word up to this many bytes of
# rows, then plain rows and a flag per program (kernels/norm.py): where each of the two is the faster
# (docs/benchmarks.md, "Figures behind defaults").
LL_MAX_BYTES = 256 << 10
# The LM head's logits gathered onto rank 0 through peer memory, up to this many bytes per rank (B=256 of
# Llama-3's vocabulary split in two, in bf16: 32 MiB); by this many programs (two flags each per rank).
GATHER_MAX_BYTES = 32 << 20
GATHER_PROGRAMS = 512  # a unit (row, 4096 columns) each at B=64: the peer loads are latency-bound
# A GEMM that pushes its rows (`push_gemm`) sends them as LL words: the GEMM's epilogue then stores and
# moves on (no fence, no flag), the doubled bytes crossing NVLink while the other programs stream the weight.
PUSH_LL = True
_ONE_SHOT_DTYPES = (torch.bfloat16, torch.float32)  # the dtypes torch's one-shot kernel is built for


class SymmetricAllReduce:
    """A TP gang's small collectives through buffers that every rank maps (NVLink peer memory): a one-shot
    all-reduce, the all-reduce fused with the residual add + RMSNorm after it (`add_rms_norm`), and the
    LM head's gather onto rank 0 (`gather_to_first`). The one-shot all-reduce:

    One kernel copies the input into this rank's buffer, waits on signal pads until every peer has
    done the same, reads all the buffers with plain loads, sums them in rank order (the same bits on
    every rank) and signals that the buffers may be reused: one launch and two peer round trips, no
    multicast. The buffer's address never changes, so the kernel is captured into CUDA graphs like
    any other; every rank must run the same sequence of them (as it must NCCL's).
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int = SYMMETRIC_MAX_BYTES,
                 push_gemm: bool = False):
        self.group_name = group.group_name
        self.push_gemm = push_gemm  # row-parallel GEMMs push their rows themselves (`linear_add_rms_norm`)
        self.push_ll = PUSH_LL
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)  # collective: every rank, same order
        # The fused all-reduce + add + RMSNorm (`add_rms_norm`): its own allocation, two slots that consecutive
        # calls alternate between, each with a region per source rank for rows of up to max_bytes (as LL words
        # and as plain rows, norm.fused_buffer_bytes), zeroed (a word or flag left over must carry no epoch a
        # call awaits) before any rank pushes into it; and each slot's epoch counter.
        self.region_words = max_bytes // 4
        world = group.size()
        self.fused, handle, self.buffer_ptrs, _ = self._peer_table(
            norm.fused_buffer_bytes(world, self.region_words), device)
        self.fused.zero_()
        self.epochs = torch.zeros(2, dtype=torch.int32, device=device)
        self.rank = handle.rank
        self.ll_max_bytes = LL_MAX_BYTES
        dist.all_reduce(torch.zeros(1, device=device), group=group)  # every rank's buffer zeroed before a push
        # The gather onto rank 0 (`gather_to_first`): a third allocation, its pad's "done" tokens given.
        self.gather_buf, handle, self.gather_ptrs, self.gather_pad_ptrs = self._peer_table(GATHER_MAX_BYTES, device)
        self.gather_programs = min(GATHER_PROGRAMS, handle.signal_pad_size // 4 // (2 * world))
        if self.rank > 0:
            flags = 2 * self.gather_programs * world
            handle.get_signal_pad(self.rank, (flags,), torch.int32)[flags // 2:].fill_(1)

    def _peer_table(self, nbytes: int, device: torch.device):
        """Collective: a new peer-mapped allocation, its handle, and int64 [world] tensors on `device` of
        every rank's address of it and of its signal pad (what the Triton kernels take)."""
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(buf, self.group_name)
        offset = buf.data_ptr() - handle.buffer_ptrs[handle.rank]  # the same on every rank
        ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=device)
        pads = torch.tensor(handle.signal_pad_ptrs, dtype=torch.int64, device=device)
        return buf, handle, ptrs, pads

    @classmethod
    def try_create(cls, group: dist.ProcessGroup, device: torch.device,
                   push_gemm: bool = False) -> SymmetricAllReduce | None:
        """Collective. The buffer on every rank, or None on every rank (then NCCL does all the
        all-reduces) where peer memory cannot be mapped or a first all-reduce comes out wrong."""
        try:
            symmetric = cls(group, device, push_gemm=push_gemm)
            works = bool((symmetric(torch.ones(4, device=device)) == group.size()).all())
            shard = torch.full((2, 3), float(group.rank()), device=device)  # rank r's columns hold r
            for _ in range(2):  # twice: the second waits on the tokens the first gave back
                got = symmetric.gather_to_first(shard, 3 * group.size(), torch.float32)
                if got is not None:
                    works = works and torch.equal(got, torch.arange(group.size(), device=device)
                                                  .repeat_interleave(3).expand(2, -1).float())
            ones = torch.ones(3, 64, device=device, dtype=torch.bfloat16)
            zeros = torch.zeros_like(ones)
            for slot in (0, 1, 0, 1):  # each slot's next epoch too; sum of ones = group size, normalized: ones
                y, total = symmetric.add_rms_norm(ones, zeros, ones[0], 0.0, slot)
                works = works and bool((total == group.size()).all()) and torch.allclose(y, ones)
            if push_gemm:  # rows of ones again, now out of a GEMM that pushes them (its weight: ones / 64)
                weight = torch.full((64, 64), 1 / 64, device=device, dtype=torch.bfloat16)
                config = symmetric.push_config(ones, weight, zeros)
                if config is not None:
                    for slot in (0, 1, 0, 1):
                        y, total = symmetric.linear_add_rms_norm(ones, weight, zeros, ones[0], 0.0, slot, config)
                        works = works and bool((total == group.size()).all()) and torch.allclose(y, ones)
        except RuntimeError as e:
            log.warning("symmetric memory unavailable (%s); all-reduces go through NCCL", e)
            symmetric, works = None, False
        ok = torch.tensor([works], dtype=torch.int32, device=device)
        dist.all_reduce(ok, dist.ReduceOp.MIN, group=group)  # one rank alone on the fast path would hang the gang
        return symmetric if ok.item() else None

    def can_reduce(self, x: torch.Tensor) -> bool:
        """The kernel's contract: bf16/fp32, contiguous, offset and size 16-byte aligned, fits the buffer."""
        return (x.is_cuda and x.dtype in _ONE_SHOT_DTYPES and x.is_contiguous() and x.nbytes <= self.buffer.numel()
                and x.nbytes % 16 == 0 and x.storage_offset() * x.element_size() % 16 == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group, as a new tensor (`x` is left as it was)."""
        staging = self.buffer.view(x.dtype)[: x.numel()].view(x.shape)  # exactly x's size: the kernel reduces all of it
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, "sum", self.group_name)

    def can_gather(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dim() == 2 and x.stride(-1) == 1 and x.numel() * x.element_size() <= GATHER_MAX_BYTES

    def gather_to_first(self, x: torch.Tensor, out_cols: int, out_dtype: torch.dtype) -> torch.Tensor | None:
        """Rank 0: the first `out_cols` columns of every rank's x side by side, in `out_dtype`; others: None.
        One kernel per rank; rank 0 reads the others' copies over NVLink (kernels/peer_gather.py)."""
        return peer_gather.gather_to_first_triton(
            x, out_cols, out_dtype, buffer_ptrs=self.gather_ptrs, pad_ptrs=self.gather_pad_ptrs, rank=self.rank,
            num_programs=self.gather_programs)

    def can_fuse(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return x.is_cuda and norm.can_fuse_all_reduce(x, residual) and x.nbytes <= self.max_bytes

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(sum of x over the group + residual), that sum + residual): one kernel; each rank pushes its
        rows into the others' buffers and reads only its own (kernels/norm.py).

        NOTE: `slot` (0 or 1) picks the buffer's half; two calls in a row must use different slots (a peer
        may push the next call's rows while this rank still reads the previous call's).
        """
        return norm.all_reduce_add_rms_norm_triton(
            x, residual, weight, eps, buffer_ptrs=self.buffer_ptrs, epochs=self.epochs, slot=slot,
            region_words=self.region_words, rank=self.rank, num_programs=norm.MAX_FUSED_PROGRAMS,
            ll=x.nbytes <= self.ll_max_bytes)

    def push_config(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> gemm.SkinnyConfig | None:
        """The GEMM config `linear_add_rms_norm` runs this projection with, or None where it does not take it
        (pushing off, or a GEMM the pushing kernel cannot run or whose output the fused all-reduce cannot)."""
        config = gemm.push_config(x, weight) if self.push_gemm and x.is_cuda else None
        rows = x.shape[0]
        fits = (residual.shape == (rows, weight.shape[0]) and residual.dtype == x.dtype
                and rows * weight.shape[0] * x.element_size() <= self.max_bytes
                and norm.can_fuse_all_reduce(residual, residual))
        return config if config is not None and fits else None

    def linear_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                            norm_weight: torch.Tensor, eps: float, slot: int, config: gemm.SkinnyConfig
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_rms_norm` of this rank's partial sums x @ weight.T, in two kernels: the GEMM (`config`, from
        `push_config`) pushes each column tile of its result into the peers' buffers as soon as it is
        computed (while the rest of the weight still streams in), and the all-reduce after it only waits,
        sums and normalizes. Same slots, and the same bits as `add_rms_norm` of the same partial sums."""
        partial, tiles = gemm.skinny_linear_push_triton(
            x, weight, config, buffer_ptrs=self.buffer_ptrs, epochs=self.epochs, slot=slot,
            region_words=self.region_words, rank=self.rank, ll=self.push_ll)
        return norm.all_reduce_add_rms_norm_triton(
            partial, residual, norm_weight, eps, buffer_ptrs=self.buffer_ptrs, epochs=self.epochs, slot=slot,
            region_words=self.region_words, rank=self.rank, num_programs=norm.MAX_FUSED_PROGRAMS, ll=self.push_ll,
            pushed_tiles=tiles)


@dataclass(frozen=True)
class TPGroup:
    """This rank's place in its gang. `group` is None when `size == 1`: no collectives at all.

    `symmetric`, when set, takes the all-reduces it can (small CUDA tensors); everything else goes
    through `group`'s own backend (NCCL on GPU, gloo on CPU).
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    symmetric: SymmetricAllReduce | None = None

    @classmethod
    def create(cls, rank: int, size: int, group: dist.ProcessGroup, device: torch.device,
               push_gemm: bool = False) -> TPGroup:
        """Collective: every rank of `group` calls it, with its own device (and the same `push_gemm`: see
        `linear_all_reduce_add_rms_norm`)."""
        fast = size > 1 and device.type == "cuda"
        if push_gemm and not fast and rank == 0:
            log.info("push_gemm applies to GPU gangs of two or more ranks: ignored (%s, tp_size %d)", device.type, size)
        return cls(rank, size, group, SymmetricAllReduce.try_create(group, device, push_gemm) if fast else None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the gang: a new tensor, or `x` itself reduced in place. Use the result."""
        if self.size == 1:
            return x
        if self.symmetric is not None and self.symmetric.can_reduce(x):
            return self.symmetric(x)
        # NOTE: what the one-shot path cannot take: large messages (NCCL's bandwidth wins), CPU tensors, fp16.
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row-parallel layer's partial sums `x`, summed over the gang, then the residual add + RMSNorm:
        (norm(sum + residual), sum + residual). Small CUDA batches take one fused kernel over peer memory;
        `slot` (0/1) must alternate between consecutive calls (see `SymmetricAllReduce.add_rms_norm`)."""
        if self.symmetric is not None and self.symmetric.can_fuse(x, residual):
            return self.symmetric.add_rms_norm(x, residual, weight, eps, slot)
        return ops.fused_add_rms_norm(self.all_reduce(x), residual, weight, eps)

    def linear_all_reduce_add_rms_norm(self, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                                       norm_weight: torch.Tensor, eps: float, slot: int
                                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """A row-parallel projection of x (this rank's input shard) and then `all_reduce_add_rms_norm` of its
        partial sums. Where the gang was created with `push_gemm` and the call is small, the GEMM itself
        pushes its rows to the peers (`SymmetricAllReduce.linear_add_rms_norm`)."""
        config = self.symmetric.push_config(x, weight, residual) if self.symmetric is not None else None
        if config is not None:
            return self.symmetric.linear_add_rms_norm(x, weight, residual, norm_weight, eps, slot, config)
        return self.all_reduce_add_rms_norm(ops.linear(x, weight), residual, norm_weight, eps, slot)

    def broadcast_from_first(self, x: torch.Tensor) -> None:
        """Rank 0's `x` into every rank's `x`, in place (NCCL: ordered on the current stream, no host wait)."""
        if self.size > 1:
            dist.broadcast(x, group=self.group, group_src=0)

    def gather_logits(self, x: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The LM head's [N, vocab shard] -> fp32 [N, vocab_size] on rank 0, which alone samples. The other
        ranks get an empty [N, 0] on the peer-memory path (nothing to sample from), the logits on the
        NCCL/gloo one."""
        if self.size > 1 and self.symmetric is not None and self.symmetric.can_gather(x):
            out = self.symmetric.gather_to_first(x, vocab_size, torch.float32)
            return out if out is not None else x[:, :0].float()
        return self.all_gather_last_dim(x)[:, :vocab_size].float()

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[N, n] on each rank -> [N, size * n] in rank order."""
        if self.size == 1:
            return x
        N, n = x.shape
        gathered = x.new_empty(self.size * N, n)  # rank-major; one collective, no per-part copies
        dist.all_gather_into_tensor(gathered, x.contiguous(), group=self.group)
        return gathered.view(self.size, N, n).permute(1, 0, 2).reshape(N, self.size * n)


SINGLE = TPGroup()


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the KV heads rank `rank` holds.

    With at least as many KV heads as ranks they are split into contiguous, as-even-as-
    possible ranges (earlier ranks take one more when it does not divide); with fewer,
    each rank holds a replica of the one head its query heads use.
    """
    if num_kv_heads >= tp_size:
        base, extra = divmod(num_kv_heads, tp_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (rank < extra)
    assert tp_size % num_kv_heads == 0, f"tp_size {tp_size} is not a multiple of num_kv_heads {num_kv_heads}"
    head = rank * num_kv_heads // tp_size
    return head, head + 1


def q_head_range(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the query heads of rank `rank`: always those served by its KV heads."""
    group = num_heads // num_kv_heads
    if num_kv_heads >= tp_size:
        start, end = kv_head_range(num_kv_heads, tp_size, rank)
        return start * group, end * group
    ranks_per_head = tp_size // num_kv_heads
    assert group % ranks_per_head == 0, f"{group} query heads per KV head do not split over {ranks_per_head} ranks"
    per = group // ranks_per_head
    return rank * per, (rank + 1) * per
