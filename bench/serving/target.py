"""What a benchmark talks to: a running server's address, or a deployment YAML started in-process."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_VOCAB = 1000  # prompts stay below this id when the server cannot be asked its vocabulary size


@dataclass(frozen=True)
class Target:
    """One serving endpoint. `http_url`: http://host:port of an OpenAI-compatible API; `grpc_address`:
    host:port of our gRPC API (either may be None)."""

    label: str
    http_url: str | None = None
    grpc_address: str | None = None
    model: str | None = None  # the `model` field its OpenAI API is sent (None: left out)
    ignore_eos: bool = True  # False: the server refuses the field

    def url_for(self, backend: str) -> str:
        url = self.http_url if backend == "openai" else self.grpc_address
        if url is None:
            raise ValueError(f"{self.label}: no address for the {backend} backend")
        return url


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings (values parsed as YAML: `disaggregated=false`, `prefill={count: 2}`)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def is_url(spec: str) -> bool:
    return "://" in spec or (":" in spec and not spec.endswith((".yaml", ".yml")))


def url_target(spec: str) -> Target:
    """`http://host:port` (HTTP) or `host:port` (gRPC)."""
    return Target(spec, http_url=spec) if "://" in spec else Target(spec, grpc_address=spec)


@contextlib.contextmanager
def deployed(config_path: str | None, overrides: dict | None = None, label: str | None = None) -> Iterator[Target]:
    """Start the deployment of `config_path` (None: the embedded default) in this process, on free ports;
    stop it on exit."""
    from pdserve.cluster.serve import ServerThread
    from pdserve.config import load_config

    config = load_config(config_path, **(overrides or {}))
    router = config.router.model_copy(update={"grpc_port": 0, "http_port": 0})
    config = config.model_copy(update={"router": router})
    with ServerThread(config) as server:
        log.info("bench: %s up | gRPC %s | HTTP %s", config_path or "embedded default", server.grpc_address,
                 server.http_url)
        yield Target(label or config_path or "default", server.http_url, server.grpc_address)


def vocab_size(target: Target, given: int | None = None) -> int:
    """`given`, else the server's (over gRPC), else DEFAULT_VOCAB."""
    if given is not None:
        return given
    if target.grpc_address is not None:
        from pdserve.router.client import get_model_info

        return get_model_info(target.grpc_address).vocab_size
    log.warning("bench: vocabulary size unknown; prompt ids are drawn below %d (--vocab-size)", DEFAULT_VOCAB)
    return DEFAULT_VOCAB
