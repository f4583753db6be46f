"""Shared factories: tiny random Hugging Face checkpoints, engines over them, the HF reference."""
from __future__ import annotations

import os

import pytest
import torch

# Triton reads this once, at its first import (transformers imports it too): on a machine
# without CUDA the kernel tests run Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep torch from oversubscribing the small CI machine when Ray workers share it.
torch.set_num_threads(min(4, os.cpu_count() or 1))

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.3,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

# variant name -> (model_type, architecture, config overrides)
VARIANTS = {
    "llama-gqa-untied": ("llama", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "llama-mha-tied": ("llama", "LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-scaling": ("llama", "LlamaForCausalLM", {
        "rope_theta": 10000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    }),
    "qwen2-qkv-bias": ("qwen2", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("qwen3", "Qwen3ForCausalLM", {"tie_word_embeddings": False}),
    "mistral-sliding-window": ("mistral", "MistralForCausalLM", {"sliding_window": 8}),
}


def make_tiny_checkpoint(folder, variant: str, seed: int = 0, **overrides) -> str:
    """Write a random tiny checkpoint (config.json + safetensors) of `variant`; return its folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, arch, extra = VARIANTS[variant]
    cfg = AutoConfig.for_model(model_type, architectures=[arch], **{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if getattr(model, "model", None) is not None and model_type == "qwen2":
        for layer in model.model.layers:  # HF initialises biases to zero; make them matter
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.3)
    model.save_pretrained(folder)
    return str(folder)


BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def add_byte_tokenizer(folder) -> None:
    """Give a tiny checkpoint a real tokenizer over its 256-id vocabulary: byte-level, one id per byte, no
    merges (so any text encodes and every id decodes), with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2])
    fast.chat_template = BYTE_CHAT_TEMPLATE
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {v: make_tiny_checkpoint(root / v, v) for v in VARIANTS}


@pytest.fixture(scope="session")
def embedded_dir():
    from pdserve.engine.model_source import embedded_model_dir

    return str(embedded_model_dir())


def make_engine(model: str, **overrides):
    from pdserve.config import load_config
    from pdserve.engine.llm_engine import LLMEngine

    return LLMEngine(load_config(None, model=model, **{"device": "cpu", "dtype": "float32", **overrides}))


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int,
              ignore_eos: bool = False) -> list[list[int]]:
    """transformers' own greedy `generate`, one prompt at a time (no padding), fp32; `ignore_eos`: always
    max_new_tokens (the tiny models' EOS id would otherwise stop it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = dict(eos_token_id=None, min_new_tokens=max_new_tokens) if ignore_eos else {}
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0, **eos)
        outs.append(out[0, len(p):].tolist())
    return outs


def assert_pool_full(engine) -> None:
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, (
        f"{engine.kv.num_blocks - engine.kv.num_free_blocks} blocks still held"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned(monkeypatch):
    """Make every float `torch.empty` NaN-filled, so an output element a kernel never writes fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: nan_empty(x.shape, dtype=x.dtype, device=x.device))


@pytest.fixture(scope="session")
def serving_model(tmp_path_factory):
    """The serving tests' tiny model (with a byte tokenizer): (path, prompt ids of TEXTS, greedy reference)."""
    from serving_support import MAX_TOKENS, TEXTS, tiny_model

    from pdserve.engine.tokenizer import load_tokenizer

    path = tiny_model(tmp_path_factory.mktemp("serving") / "tiny")
    tok = load_tokenizer(path)
    prompts = [tok.encode_prompt(t) for t in TEXTS]
    return path, prompts, hf_greedy(path, prompts, MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="session")
def path(serving_model):
    return serving_model[0]


@pytest.fixture(scope="session")
def prompts(serving_model):
    return serving_model[1]


@pytest.fixture(scope="session")
def expected(serving_model):
    return serving_model[2]
