"""Engine benchmark: decode step time and prefill throughput on a real model shape, against this GPU's
ceilings and against `transformers` on the same shape, all measured in one run.

    python -m pdserve.bench.engine [--model configs/models/llama3-8b] [--tp 1|2] [--out DIR]

Decode: B sequences of `--context` cached tokens each take one step; the step reads every weight
once and every sequence's KV, so (weight bytes + KV bytes) / step time is compared with the
device-copy bandwidth. Two decode figures: one step alone (the step's metadata uploaded, the model
run, every rank synchronised at its end), and the engine's own loop in steady state (B requests of
`--context` prompt tokens decoding together through `LLMEngine.step`: scheduling, building, running,
sampling and reading the tokens, with asynchronous scheduling on: what a serving engine's decode
step costs). Prefill: 8 x 2048 new tokens in one step; model FLOPs (2 per weight per token, plus
causal attention) / time is compared with the bf16 GEMM rate. With --tp N the model runs as a TP
gang of N Ray actors (one GPU each); times are taken on rank 0, which drives the step.

`--rank-share N` also runs, on one GPU, the model a rank of a TP=N gang holds (heads, intermediate size and
vocabulary divided by N) without any collective: the floor of a TP=N step, and with it how much of a
measured TP=N step is communication. `--profile B` prints the decode step's GPU time at batch B by kernel.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from pdserve.config import load_config
from pdserve.engine.model_config import ModelSpec
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.step import StepBatch

DECODE_BATCHES = (1, 16, 64, 256)
LOOP_STEPS = 24  # timed decode steps of the engine loop per batch size
# measure()'s decode figures: (result key, row label)
DECODE_FIGURES = (("decode_s", "decode"), ("loop_decode_s", "loop"), ("loop_sync_decode_s", "sync loop"))


def synthetic_step(batch: int, new_tokens: int, context: int, block_size: int) -> StepBatch:
    """`batch` sequences, each with `context` cached tokens and `new_tokens` new ones, in disjoint blocks."""
    total = context + new_tokens
    per_seq = -(-total // block_size)
    tables = torch.arange(batch * per_seq, dtype=torch.int32).view(batch, per_seq)
    pos = torch.arange(context, total).repeat(batch)  # [B * new]
    seq = torch.arange(batch).repeat_interleave(new_tokens)
    slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
    q_start = torch.arange(batch + 1, dtype=torch.int32) * new_tokens
    return StepBatch(
        input_ids=torch.randint(0, 1000, (batch * new_tokens,)), positions=pos, slot_mapping=slots,
        block_tables=tables, query_start_loc=q_start, seq_lens=torch.full((batch,), total, dtype=torch.int32),
        logits_indices=q_start[1:].long() - 1, decode_only=new_tokens == 1,
    )


def time_step(execute, batch: StepBatch, iters: int = 10) -> float:
    """Median seconds of `execute(batch)` (warmed up), synchronised around each call."""
    for _ in range(3):
        execute(batch)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        execute(batch)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def sync() -> None:
    """Wait for the device (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def loop_step(engine, batch: int, context: int, steps: int = LOOP_STEPS) -> float:
    """Seconds per decode step of `engine.step()` in steady state: `batch` requests of `context` random prompt
    tokens, prefilled first, then `steps` steps timed by the host clock between two device syncs."""
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=steps + 16)
    vocab = min(1000, engine.spec.vocab_size)
    ids = [engine.add_request([rng.randrange(vocab) for _ in range(context)], params) for _ in range(batch)]
    reqs = [engine.requests[i] for i in ids]
    while any(not r.output_token_ids for r in reqs):  # every prompt prefilled and its first token read
        engine.step()
    for _ in range(3):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = (time.perf_counter() - start) / steps
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    return elapsed


def measure(engine, context: int, batches=DECODE_BATCHES) -> dict:
    """Decode step times per batch (one step alone, and the engine's loop) and the 8 x 2048 prefill time, on
    `engine` (an LLMEngine or rank 0's)."""
    bs = engine.config.block_size
    decode = {b: time_step(engine.execute, synthetic_step(b, 1, context, bs)) for b in batches}
    prefill = time_step(engine.execute, synthetic_step(8, 2048, 0, bs), iters=5)
    overlap = engine.async_scheduling
    loop = {b: loop_step(engine, b, context) for b in batches}
    engine.async_scheduling = False  # the same loop reading each step's tokens before planning the next
    loop_sync = {b: loop_step(engine, b, context) for b in batches}
    engine.async_scheduling = overlap
    return {"decode_s": decode, "prefill_s": prefill, "loop_decode_s": loop, "loop_sync_decode_s": loop_sync,
            "async_scheduling": overlap}


def model_amounts(spec: ModelSpec, tp: int) -> dict:
    """Bytes read per decode step (weights + KV, per rank) and FLOPs of the 8 x 2048 prefill (whole model)."""
    d, h = spec.head_dim, spec.hidden_size
    attn = h * d * (spec.num_heads + 2 * spec.num_kv_heads) + spec.num_heads * d * h
    mlp = 3 * h * spec.intermediate_size
    layer_params = spec.num_layers * (attn + mlp)
    weight_bytes = 2 * (layer_params + spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)) / tp
    kv_per_token = spec.kv_bytes_per_token(torch.bfloat16) / tp
    seqs, seq = 8, 2048
    flops = 2 * seqs * seq * (layer_params + spec.vocab_size * h / seq)  # head only on the last token
    flops += seqs * spec.num_layers * 2 * seq * seq * spec.num_heads * d  # causal QK^T and PV
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "prefill_flops": flops}


def hf_baseline(model_dir: str, context: int, batches) -> dict:
    """transformers on the same shape (random weights, bf16, SDPA attention, its dynamic KV cache)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    out = {"decode_s": {}}
    with torch.inference_mode():
        ids = torch.randint(0, 1000, (8, 2048), device="cuda")
        out["prefill_s"] = time_step(lambda _: model(ids, use_cache=False, logits_to_keep=1), None, iters=5)
        for b in batches:
            prompt = torch.randint(0, 1000, (b, context), device="cuda")
            past = model(prompt, use_cache=True, logits_to_keep=1).past_key_values
            nxt = torch.randint(0, 1000, (b, 1), device="cuda")

            def one(_, past=past, nxt=nxt):
                model(nxt, past_key_values=past, use_cache=True)
                past.crop(context)  # keep the context fixed across repeats

            out["decode_s"][b] = time_step(one, None)
            del past
            torch.cuda.empty_cache()
    return out


def report(name: str, res: dict, amounts: dict, ceil: dict, context: int, num_gpus: int = 1) -> list[dict]:
    """Decode: bytes each rank reads / step time / copy bandwidth. Prefill: FLOP/s per GPU / GEMM rate."""
    rows = []
    for key, label in DECODE_FIGURES:
        for b, t in res.get(key, {}).items():
            moved = amounts["weight_bytes"] + b * context * amounts["kv_bytes_per_token"]
            rows.append({"engine": name, "case": f"{label} B={b} ctx={context}", "ms": t * 1e3,
                         "of_ceiling": moved / t / ceil["copy_bytes_per_s"]})
    rate = amounts["prefill_flops"] / res["prefill_s"] / num_gpus
    rows.append({"engine": name, "case": "prefill 8x2048", "ms": res["prefill_s"] * 1e3,
                 "of_ceiling": rate / ceil["gemm_bf16_flop_per_s"]})
    return rows


def kernel_profile(engine, batch: int, context: int, steps: int = 5) -> dict:
    """The decode step at `batch`, replayed `steps` times under torch's profiler: GPU time per step by kernel
    (µs, calls per step), the sum, and the step's wall time; what is left between them is launch gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step = synthetic_step(batch, 1, context, engine.config.block_size)
    wall = time_step(engine.execute, step)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.execute(step)
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:  # host-side events (their kernels are listed themselves)
            continue
        us = e.device_time_total / steps
        if us > 0 and e.count:
            kernels[e.key] = {"us": us, "calls": e.count / steps}
    return {"batch": batch, "wall_us": wall * 1e6, "kernel_us": sum(k["us"] for k in kernels.values()),
            "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"]))}


def print_profile(name: str, prof: dict, top: int = 16) -> None:
    print(f"{name}: decode step B={prof['batch']}: {prof['wall_us']:.0f} µs, kernels {prof['kernel_us']:.0f} µs "
          f"(gaps {prof['wall_us'] - prof['kernel_us']:.0f})")
    for key, k in list(prof["kernels"].items())[:top]:
        print(f"  {k['us']:8.1f} µs {k['calls']:5.0f} x {k['us'] / k['calls']:6.2f}  {key[:90]}")


def rank_share_model(model_dir: str, n: int, folder: str) -> str:
    """A model whose config is one rank's share of `model_dir` at TP=n (query/KV heads, intermediate size and
    vocabulary divided by n, hidden size kept): what each rank of a gang computes, run without collectives."""
    cfg = json.loads(Path(model_dir, "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        assert cfg[key] % n == 0, f"{key} {cfg[key]} does not split {n} ways"
        cfg[key] //= n
    for key in ("bos_token_id", "eos_token_id"):  # ids of the full vocabulary; the share's is smaller
        cfg[key] = 0
    Path(folder, "config.json").write_text(json.dumps(cfg))
    return folder


def run_single(config, context: int, batches, profile_batch: int | None = None) -> tuple[dict, ModelSpec]:
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    res = measure(engine, context, batches)
    if profile_batch:
        res["profile"] = kernel_profile(engine, profile_batch, context)
    spec = engine.spec
    del engine
    torch.cuda.empty_cache()
    return res, spec


def run_gang(config, tp: int, context: int, batches) -> tuple[dict, ModelSpec]:
    import ray

    from pdserve.cluster.tp_gang import TPGang

    ray.init(num_gpus=tp, include_dashboard=False, logging_level="ERROR")
    gang = TPGang(config, tp)
    try:
        res = gang._wait(gang.ranks[0].run_on_engine.remote(measure, context, list(batches)), 1800, "bench")
        return {**res, "symmetric_all_reduce": gang.symmetric_all_reduce}, gang.spec
    finally:
        gang.shutdown()
        ray.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="configs/models/llama3-8b")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batches", default=",".join(map(str, DECODE_BATCHES)))
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", default=None, help="folder for engine_tp{N}.json")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch every kernel plainly (kernels/launch.py; the in-process TP=1 engine only)")
    ap.add_argument("--rank-share", type=int, default=0,
                    help="also run one rank's share of the model at TP=N on one GPU, without collectives")
    ap.add_argument("--profile", type=int, default=0, help="kernel profile of the decode step at this batch")
    ap.add_argument("--push-gemm", action="store_true",
                    help="with --tp N: a second gang whose row-parallel GEMMs push their rows (push_gemm)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("pdserve.bench.engine needs a CUDA GPU", file=sys.stderr)
        return 2
    from pdserve.bench.kernels import ceilings
    from pdserve.kernels import launch

    launch.USE_PDL = not args.no_pdl

    batches = [int(b) for b in args.batches.split(",")]
    # synthetic steps give each sequence whole blocks; the loop's requests grow by up to LOOP_STEPS + 16 tokens
    blocks = max(batches) * -(-(args.context + LOOP_STEPS + 16) // 16) + 8
    config = load_config(None, model=args.model, load_format="dummy", dtype="bfloat16", device="cuda",
                         num_kv_blocks=max(blocks, 8 * 2048 // 16 + 8), max_model_len=4096,
                         max_num_seqs=max(batches), max_num_batched_tokens=16384)
    ceil = ceilings()
    res, spec = run_single(config, args.context, batches, args.profile)  # TP=1: the in-run baseline for TP=N
    rows = report("pdserve tp1", res, model_amounts(spec, 1), ceil, args.context)
    profiles = {"tp1": res.get("profile")}
    if args.rank_share > 1:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            share_config = config.model_copy(update={"model": rank_share_model(args.model, args.rank_share, folder)})
            res_share, _ = run_single(share_config, args.context, batches, args.profile)
        name = f"1/{args.rank_share} share"
        rows += report(name, res_share, model_amounts(spec, args.rank_share), ceil, args.context)
        profiles[name] = res_share.get("profile")
        for key, label in DECODE_FIGURES:
            for b in batches:
                rows.append({"engine": f"{name}/tp1", "case": f"{label} B={b} time ratio", "ms": float("nan"),
                             "of_ceiling": res_share[key][b] / res[key][b]})
    gangs = [("", config)] + ([("push", config.model_copy(update={"push_gemm": True}))] if args.push_gemm else [])
    for suffix, gang_config in gangs if args.tp > 1 else []:
        name = f"tp{args.tp}{' ' + suffix if suffix else ''}"
        res_tp, _ = run_gang(gang_config, args.tp, args.context, batches)
        amounts_tp = model_amounts(spec, args.tp)
        rows += report(f"pdserve {name}", res_tp, amounts_tp, ceil, args.context, num_gpus=args.tp)
        path = ("peer memory (one-shot, fused with the add + RMSNorm, logits onto rank 0) for decode, NCCL for "
                "prefill" if res_tp["symmetric_all_reduce"] else "NCCL only")
        print(f"{name} collectives: {path}")
        for key, label in DECODE_FIGURES:
            for b in batches:
                rows.append({"engine": f"{name}/tp1", "case": f"{label} B={b} time ratio", "ms": float("nan"),
                             "of_ceiling": res_tp[key][b] / res[key][b]})
    if not args.no_hf:
        hf = hf_baseline(args.model, args.context, batches)
        rows += report("transformers", hf, model_amounts(spec, 1), ceil, args.context)
    for name, prof in profiles.items():
        if prof:
            print_profile(name, prof)
    copy_tb, gemm_tf = ceil["copy_bytes_per_s"] / 1e12, ceil["gemm_bf16_flop_per_s"] / 1e12
    print(f"copy {copy_tb:.2f} TB/s, bf16 GEMM {gemm_tf:.0f} TFLOP/s")
    print(f"{'engine':<16}{'case':<26}{'ms':>10}{'of ceiling':>12}")
    for r in rows:
        print(f"{r['engine']:<16}{r['case']:<26}{r['ms']:>10.3f}{r['of_ceiling']:>12.3f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, f"engine_tp{args.tp}.json").write_text(json.dumps({"ceilings": ceil, "rows": rows,
                                                                          "profiles": profiles}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
