"""`pdserve` command line: generate, config validate."""
from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from pdserve.config import EMBEDDED_MODEL, load_config
from pdserve.errors import PdserveError


def _generate(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _generate_remote(args)
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.tokenizer import load_tokenizer

    config = load_config(args.config, model=args.model, dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )
    engine = LLMEngine(config) if args.tp == 1 else _tp_gang(config, args.tp)
    tokenizer = load_tokenizer(engine.spec.path)
    ids = tokenizer.encode_prompt(args.prompt, chat=args.chat)
    [out] = engine.generate([ids], params)
    print(tokenizer.decode(out))
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    """Through a running server's gRPC API; same output as in-process."""
    from pdserve.router.client import generate_text

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k, "seed": args.seed}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if args.chat:
        out = generate_text(args.url, messages=[{"role": "user", "content": args.prompt}], sampling=sampling,
                            api_key=args.api_key, timeout_s=args.timeout)
    else:
        out = generate_text(args.url, text=args.prompt, sampling=sampling, api_key=args.api_key,
                            timeout_s=args.timeout)
    print(out.text)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pdserve.cluster.serve import serve

    return serve(load_config(args.config), verbose=args.verbose)


def _status(args: argparse.Namespace) -> int:
    from pdserve.router.status import fetch_status, format_status

    print(format_status(fetch_status(args.url, api_key=args.api_key, timeout_s=args.timeout)))
    return 0


def _tp_gang(config, tp: int):
    from pdserve.cluster.tp_gang import TPGang

    return TPGang.local(config, tp)


def _validate(args: argparse.Namespace) -> int:
    load_config(args.file)
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Prefill-decode disaggregated LLM serving")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="run the engine in-process on one prompt; print the completion")
    g.add_argument("prompt")
    g.add_argument("--model", default=None, help=f"a local Hugging Face folder, or {EMBEDDED_MODEL!r} (default)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None)
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    g.add_argument("-c", "--config", default=None, help="deployment YAML (default: the embedded default)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (a gang of Ray actors when > 1)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--url", default=None, help="HOST:PORT of a running server's gRPC API (default: in-process)")
    g.add_argument("--api-key", default=None, help="with --url: the server's API key")
    g.add_argument("--timeout", type=float, default=300.0, help="with --url: the call's deadline in seconds")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="bring up the deployment's workers and serve gRPC and HTTP until stopped")
    s.add_argument("-c", "--config", default=None, help="deployment YAML (default: the embedded default)")
    s.add_argument("-v", "--verbose", action="store_true", help="Ray's and the workers' logs too")
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="pools and workers of a running server")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address")
    st.add_argument("--api-key", default=None)
    st.add_argument("--timeout", type=float, default=10.0)
    st.set_defaults(func=_status)

    c = sub.add_parser("config", help="deployment files")
    csub = c.add_subparsers(dest="config_command", required=True)
    v = csub.add_parser("validate", help="check a deployment YAML; print ok or what is wrong")
    v.add_argument("file")
    v.set_defaults(func=_validate)

    # Commands that other parts of the distribution add (the serving benchmark's `bench`), declared in
    # pyproject.toml's entry points: the product imports nothing from the benchmarks.
    for command in entry_points(group="pdserve.commands"):
        command.load()(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PdserveError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
