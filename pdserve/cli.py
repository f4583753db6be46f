"""`pdserve` command line: generate, serve, status, config validate, bench.

One function per subcommand. `main` is the one place that turns what a user can get wrong into
one line on stderr: a `PdserveError` prints `error: <message>` and exits 2, as does a usage
error (argparse's, made one line); Ctrl-C exits 130 quietly. Libraries' warnings (Ray's,
torch's, transformers') stay off the terminal unless `-v` is given.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from importlib.metadata import entry_points

EXIT_USAGE = 2  # usage and input errors, as argparse
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C

log = logging.getLogger(__name__)


def _generate(args: argparse.Namespace) -> int:
    from pdserve.engine.tokenizer import check_text

    check_text(args.prompt)
    if args.url is not None:
        return _generate_remote(args)
    from pdserve.config import load_config
    from pdserve.engine.model_source import resolve_tokenizer
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.tokenizer import load_tokenizer
    from pdserve.errors import InvalidRequestError

    config = load_config(args.config, model=args.model, dtype=args.dtype, device=args.device)
    limit = config.limits.max_tokens
    if args.max_tokens > limit:
        raise InvalidRequestError(f"--max-tokens: {args.max_tokens} is above limits.max_tokens ({limit})")
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed,
    )
    shape = _check_before_start(config, args)
    tokenizer = load_tokenizer(resolve_tokenizer(config.tokenizer, shape.path))
    ids = tokenizer.encode_prompt(args.prompt, chat=args.chat)
    max_prompt = config.limits.max_prompt_tokens
    if max_prompt is not None and len(ids) > max_prompt:
        raise InvalidRequestError(f"prompt has {len(ids)} tokens; limits.max_prompt_tokens is {max_prompt}")
    log.info("loading %s (%d rank(s))", shape.path, args.tp)
    engine = _engine(config, args.tp)
    log.info("generating up to %d tokens after a %d-token prompt", args.max_tokens, len(ids))
    tokens, reason = _complete(engine, ids, params)
    print(tokenizer.decode(tokens))
    if reason == "length" and len(ids) + len(tokens) >= engine.max_model_len:
        print(f"finish_reason: length (prompt {len(ids)} + completion {len(tokens)} tokens reached "
              f"max_model_len {engine.max_model_len})", file=sys.stderr)
    return 0


def _check_before_start(config, args: argparse.Namespace):
    """What can be known before a rank starts: the model, the TP size, the KV caches' memory."""
    from pdserve.validate import check_kv_memory, check_model, check_tp_size, runs_here_on_cpu

    shape = check_model(config, args.config if args.model is None else None)
    check_tp_size(shape, args.tp, "--tp")
    if runs_here_on_cpu(config):
        check_kv_memory(config, shape, [args.tp], args.config)
    return shape


def _engine(config, tp: int):
    if tp == 1:
        from pdserve.engine.llm_engine import LLMEngine

        return LLMEngine(config)
    from pdserve.cluster.tp_gang import TPGang

    return TPGang.local(config, tp)


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
    from pdserve.config import load_config
    from pdserve.validate import validate_deployment

    config = validate_deployment(load_config(args.config), args.config)  # before anything heavy is imported
    from pdserve.cluster.serve import serve

    return serve(config, verbose=args.verbose > 0)


def _status(args: argparse.Namespace) -> int:
    from pdserve.router.status import fetch_status, format_status

    print(format_status(fetch_status(args.url, api_key=args.api_key, timeout_s=args.timeout)))
    return 0


def _complete(engine, ids: list[int], params) -> tuple[list[int], str | None]:
    """Run one request to its end: its tokens and its finish reason."""
    engine.add_request(ids, params)
    tokens, reason = [], None
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            reason = out.finish_reason or reason
    return tokens, reason


def _validate(args: argparse.Namespace) -> int:
    from pdserve.config import load_config
    from pdserve.validate import validate_deployment

    validate_deployment(load_config(args.file), args.file)
    print("ok")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line, `error: <prog>: <what> (see <prog> --help)`."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pdserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _verbosity(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more logging: -v pdserve's progress (INFO), -vv everything, libraries' warnings "
                        "included (default: errors and pdserve's own warnings only)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdserve", description="Prefill-decode disaggregated LLM serving")
    p.add_argument("--version", action="version", version=f"pdserve {_version()}")
    _verbosity(p, 0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to run")

    g = sub.add_parser("generate", help="run the engine in-process on one prompt; print the completion",
                       description="Run the engine in-process on one prompt and print the completion on stdout.")
    g.add_argument("prompt", help="the prompt text (UTF-8)")
    g.add_argument("--model", default=None,
                   help="a local Hugging Face folder, or SmolLM2-135M-Instruct (default: the deployment's "
                        "model; the embedded SmolLM2-135M-Instruct without -c)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                   help="weights' and activations' dtype; auto keeps the checkpoint's (default: the deployment's, "
                        "auto)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where the model runs; auto: a GPU if one is visible (default: the deployment's, auto)")
    g.add_argument("-c", "--config", default=None,
                   help="deployment YAML (default: the built-in default, configs/default.yaml)")
    g.add_argument("--max-tokens", type=int, default=128,
                   help="most tokens to generate, at most the deployment's limits.max_tokens (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    g.add_argument("--seed", type=int, default=None, help="random seed of sampling (default: none, not repeatable)")
    g.add_argument("--tp", type=_positive_int, default=1,
                   help="tensor-parallel ranks: a gang of Ray actors when > 1, on the deployment's Ray cluster "
                        "or a local one (default: 1)")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (default: off)")
    g.add_argument("--url", default=None,
                   help="HOST:PORT of a running server's gRPC API to ask instead (default: none, in-process)")
    g.add_argument("--api-key", default=None, help="with --url: the server's API key (default: none)")
    g.add_argument("--timeout", type=float, default=300.0, help="with --url: the call's deadline in seconds "
                                                                  "(default: 300)")
    _verbosity(g, argparse.SUPPRESS)
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="bring up the deployment's workers and serve gRPC and HTTP until stopped",
                       description="Bring up the deployment's workers and serve gRPC and HTTP until stopped.")
    s.add_argument("-c", "--config", default=None,
                   help="deployment YAML (default: the built-in default, configs/default.yaml)")
    _verbosity(s, argparse.SUPPRESS)
    s.set_defaults(func=_serve)

    st = sub.add_parser("status", help="pools and workers of a running server",
                        description="Pools and workers of a running server.")
    st.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP address "
                                                                  "(default: http://127.0.0.1:8000)")
    st.add_argument("--api-key", default=None, help="the server's API key (default: none)")
    st.add_argument("--timeout", type=float, default=10.0, help="the call's deadline in seconds (default: 10)")
    _verbosity(st, argparse.SUPPRESS)
    st.set_defaults(func=_status)

    c = sub.add_parser("config", help="deployment files", description="Deployment files.")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="COMMAND", help="what to do")
    v = csub.add_parser("validate", help="check a deployment YAML and its model without loading weights; "
                                         "print ok or what is wrong",
                        description="Check a deployment YAML and its model's files (no weights are loaded); "
                                    "print ok, or one line per problem.")
    v.add_argument("file", help="the deployment YAML")
    _verbosity(v, argparse.SUPPRESS)
    v.set_defaults(func=_validate)

    # Commands that other parts of the distribution add (the serving benchmark's `bench`), declared in
    # pyproject.toml's entry points: the product imports nothing from the benchmarks.
    for command in entry_points(group="pdserve.commands"):
        command.load()(sub)
    return p


def _setup_logging(verbosity: int) -> None:
    """pdserve's own warnings always; -v its INFO; -vv DEBUG and every library's warnings."""
    pdserve_level = (logging.WARNING, logging.INFO)[verbosity] if verbosity < 2 else logging.DEBUG
    logging.basicConfig(level=logging.ERROR if verbosity < 2 else logging.DEBUG, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pdserve").setLevel(pdserve_level)
    if verbosity < 2:
        warnings.simplefilter("ignore")  # torch's and transformers' Python warnings
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    else:
        logging.captureWarnings(True)


def main(argv: list[str] | None = None) -> int:
    from pdserve.errors import PdserveError

    try:
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        return args.func(args)
    except PdserveError as e:
        print("\n".join(f"error: {line}" for line in e.message.splitlines()), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
