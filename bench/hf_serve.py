"""pdserve colocated against `transformers serve --continuous-batching` on the same machine, in one run: one
checkpoint (random weights at a real model's shape, written once), the same text prompts, the same load,
one server after the other.

    python -m pdserve.bench.hf_serve --tokenizer DIR [--shape configs/models/llama3-8b] [--out DIR]

The checkpoint is `--shape`'s config.json with random weights (seeded), and `--tokenizer`'s tokenizer with
placeholder tokens added up to the model's vocabulary, so every id the model can sample has text. Prompts
are text (`--tokenizer`'s words, exactly `--input-len` tokens each), since `transformers serve` takes only
text; it refuses `ignore_eos`, so it is asked for `--output-len` tokens without it (random weights rarely
sample the end-of-sequence id; its usage counts the tokens it did send). JSON and PNGs go to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pdserve.bench.serving.target import Target

log = logging.getLogger(__name__)

SHAPE = Path(__file__).resolve().parent.parent / "configs" / "models" / "llama3-8b"


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this module's arguments, the `pdserve bench` arguments they imply)."""
    p = argparse.ArgumentParser(prog="python -m pdserve.bench.hf_serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder (padded into the checkpoint)")
    p.add_argument("--shape", default=str(SHAPE), help="a folder with the model's config.json")
    p.add_argument("--checkpoint", default=None, help="where the checkpoint goes (default: OUT/checkpoint)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--streams", type=int, default=64, help="concurrent streams (closed loop)")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-args", default="--continuous-batching", help="arguments for `transformers serve`")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pdserve deployment fields")
    p.add_argument("--out", default="bench-results")
    args = p.parse_args(argv)
    from pdserve.bench.serving.cli import add_bench_parser

    root = argparse.ArgumentParser()
    add_bench_parser(root.add_subparsers(dest="command"))
    bench = root.parse_args(["bench", "serve", "--backend", "openai", "--num-prompts", str(args.num_prompts),
                             "--warmup", str(args.warmup), "--input-len", str(args.input_len),
                             "--output-len", str(args.output_len), "--max-concurrency", str(args.streams),
                             "--seed", str(args.seed), "--out", args.out, "--no-progress"])
    return args, bench


def make_checkpoint(shape: str, tokenizer: str, folder: Path, seed: int, device: str) -> Path:
    """Write (once) random bf16 weights of `shape`'s config and the padded tokenizer into `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    config = AutoConfig.from_pretrained(shape)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    tok.add_tokens([f"<x{i}>" for i in range(len(tok), config.vocab_size)])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the servers need the memory
    tmp.rename(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def transformers_serve(checkpoint: Path, extra: str, log_path: Path, timeout_s: float):
    """`transformers serve` on `checkpoint` in a child process, until it answers /health; stopped on exit."""
    port = free_port()
    (Path.home() / ".cache" / "huggingface" / "hub").mkdir(parents=True, exist_ok=True)  # /v1/models needs it
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(checkpoint), *extra.split(),
           "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as logf:
        child = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout_s
            while True:
                if child.poll() is not None:
                    raise SystemExit(f"transformers serve exited with {child.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"transformers serve did not answer /health in {timeout_s:.0f} s; see {log_path}")
                time.sleep(1)
            log.info("transformers serve up at %s", url)
            yield Target("transformers serve", http_url=url, ignore_eos=False)
        finally:
            child.terminate()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=30)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args, bench = parse_args(argv)
    from pdserve.bench.serving.compare import run_targets
    from pdserve.bench.serving.target import deployed, parse_overrides

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    checkpoint = make_checkpoint(args.shape, args.tokenizer, Path(args.checkpoint or out / "checkpoint"), args.seed,
                                 args.device)
    log.info("checkpoint %s ready in %.0f s", checkpoint, time.perf_counter() - t0)
    bench.tokenizer, bench.vocab_size = str(checkpoint), 1 << 20  # text prompts; any id maps onto a word
    overrides = {"model": str(checkpoint), "device": args.device, "disaggregated": False,
                 "max_num_seqs": max(64, args.streams), "max_model_len": args.input_len + args.output_len + 64,
                 "limits": {"max_concurrent_requests": 4 * args.streams}, **parse_overrides(args.set)}
    openers = [lambda: transformers_serve(checkpoint, args.hf_args, out / "transformers_serve.log",
                                          args.start_timeout),
               lambda: deployed(None, overrides, "pdserve colocated")]
    code = run_targets(openers, bench, name="hf_serve")
    doc = json.loads((out / "hf_serve.json").read_text())
    doc["setup"] = {"shape": args.shape, "streams": args.streams, "hf_args": args.hf_args, "device": _device()}
    (out / "hf_serve.json").write_text(json.dumps(doc, indent=2))
    return code


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
