"""`pdserve.validate` in-process, and the engine's own checks before it allocates: what a deployment can
get wrong about its model, each a ConfigError that names the file and field."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import make_engine, make_tiny_checkpoint
from pdserve.config import load_config
from pdserve.engine.checkpoint import check_checkpoint, expected_shapes
from pdserve.engine.memory import host_memory_available
from pdserve.engine.model_config import load_model_spec
from pdserve.engine.model_shape import load_model_shape
from pdserve.engine.tokenizer import check_text
from pdserve.errors import ConfigError, InvalidRequestError, UnsupportedModelError
from pdserve.validate import tp_sizes_for, validate_deployment


@pytest.fixture(scope="module")
def three_kv(tmp_path_factory) -> str:
    """3 kv heads, 6 query heads, intermediate size 96."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("v") / "m", "llama-gqa-untied", num_key_value_heads=3,
                                num_attention_heads=6, hidden_size=96, intermediate_size=96)


def write(tmp_path, text: str):
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


def test_valid_deployment_comes_back_with_its_model_resolved(three_kv, tmp_path, monkeypatch):
    shutil.copytree(three_kv, tmp_path / "model")
    path = write(tmp_path, "model: model\ndevice: cpu\ndecode: {tp_size: 3}\nprefill: {tp_size: 2}\n")
    monkeypatch.chdir("/")
    config = validate_deployment(load_config(path), path)
    assert config.model == str(tmp_path / "model") and config.decode.tp_size == 3
    # parse-level configs (no load_config) resolve against the path given here
    raw = load_config(None, model="model", device="cpu")
    assert validate_deployment(raw, path).model == str(tmp_path / "model")


@pytest.mark.parametrize("tp, ok", [(1, True), (2, True), (3, True), (4, False), (5, False), (6, True), (12, False)])
def test_tp_sizes_follow_the_engine_splits(three_kv, tmp_path, tp, ok):
    """Uneven kv-head splits (2 ranks over 3 heads) and replicated heads (6 ranks: 2 per head, one query head
    each) run; 4 ranks over 3 kv heads fail on a rank after loading, so validation rejects them."""
    path = write(tmp_path, f"model: {three_kv}\ndevice: cpu\ndecode: {{tp_size: {tp}}}\n")
    if ok:
        validate_deployment(load_config(path), path)
        return
    with pytest.raises(ConfigError, match=rf"^{path}: decode\.tp_size: {tp} ranks cannot run this model: .* "
                                          rf"\(sizes that can: 1, 2, 3, 6\)$"):
        validate_deployment(load_config(path), path)


def test_tp_sizes_name_the_intermediate_size(three_kv):
    shape = load_model_shape(Path(three_kv))
    assert tp_sizes_for(shape, 12) == [1, 2, 3, 6]
    odd = dataclasses.replace(shape, intermediate_size=97)
    assert tp_sizes_for(odd, 12) == [1]


def test_colocated_deployment_ignores_the_prefill_pool(three_kv, tmp_path):
    path = write(tmp_path, f"model: {three_kv}\ndevice: cpu\ndisaggregated: false\nprefill: {{tp_size: 4}}\n")
    validate_deployment(load_config(path), path)


def test_kv_cache_memory_counts_every_local_rank(three_kv, tmp_path):
    gib = host_memory_available() / 2**30 / 5  # two workers of TP 3: six of these would not fit
    path = write(tmp_path, f"model: {three_kv}\ndevice: cpu\ncpu_kv_cache_gib: {gib:.3f}\n")
    validate_deployment(load_config(path), path)
    path.write_text(path.read_text() + "prefill: {tp_size: 3}\ndecode: {tp_size: 3}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: cpu_kv_cache_gib: 6 rank\(s\) need [\d.]+ GiB of KV cache"):
        validate_deployment(load_config(path), path)
    remote = path.read_text() + "ray: {address: auto}\n"  # the ranks run elsewhere: not this machine's business
    path.write_text(remote)
    validate_deployment(load_config(path), path)


def test_num_kv_blocks_larger_than_memory(three_kv, tmp_path):
    path = write(tmp_path, f"model: {three_kv}\ndevice: cpu\nnum_kv_blocks: 1000000000000\n")
    with pytest.raises(ConfigError, match=rf"^{path}: num_kv_blocks: 2 rank\(s\) need [\d.]+ GiB of KV cache"):
        validate_deployment(load_config(path), path)


def test_model_errors_name_the_file(tmp_path):
    path = write(tmp_path, "model: nowhere\n")
    with pytest.raises(ConfigError) as err:
        validate_deployment(load_config(path), path)
    assert err.value.message == (f"{path}: model: '{tmp_path / 'nowhere'}' is neither a folder with a config.json "
                                 f"nor the embedded model 'SmolLM2-135M-Instruct'")


def test_unsupported_architecture_names_the_file(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    path = write(tmp_path, "model: gpt2\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model: architecture 'GPT2LMHeadModel' is not supported"):
        validate_deployment(load_config(path), path)


def test_dummy_weights_need_no_checkpoint(three_kv, tmp_path):
    shutil.copy(f"{three_kv}/config.json", tmp_path / "config.json")
    path = write(tmp_path, "model: .\nload_format: dummy\ndevice: cpu\n")
    validate_deployment(load_config(path), path)
    path.write_text("model: .\ndevice: cpu\n")
    with pytest.raises(ConfigError, match=r"model: no \*\.safetensors files in"):
        validate_deployment(load_config(path), path)


def test_config_json_values_are_checked(tmp_path, three_kv):
    model = tmp_path / "m"
    shutil.copytree(three_kv, model)
    cfg = json.loads((model / "config.json").read_text())
    for edit, message in [({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive integer, got '2'"),
                          ({"num_key_value_heads": 4}, "num_attention_heads (6) is not a multiple of "
                                                       "num_key_value_heads (4)"),
                          ({"max_position_embeddings": None}, "lacks required fields: max_position_embeddings")]:
        (model / "config.json").write_text(json.dumps({k: v for k, v in {**cfg, **edit}.items() if v is not None}))
        with pytest.raises(ConfigError, match=rf"^model: {model}/config.json:? {re.escape(message)}$"):
            load_model_spec(model)


def test_generation_config_that_is_not_json(tmp_path, three_kv):
    model = tmp_path / "m"
    shutil.copytree(three_kv, model)
    (model / "generation_config.json").write_text("{oops")
    with pytest.raises(ConfigError, match=rf"^model: {model}/generation_config.json: "):
        load_model_spec(model)


def test_checkpoint_missing_a_tensor(tmp_path, three_kv):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(three_kv, model)
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    save_file(tensors, model / "model.safetensors")
    spec = load_model_spec(model)
    assert len(expected_shapes(spec)) == 3 + 2 * 9  # embed, norm, head; 9 per layer
    with pytest.raises(ConfigError, match=rf"^model: the checkpoint in {model} lacks lm_head.weight, "
                                          rf"layers.1.mlp.up_proj.weight$"):
        check_checkpoint(spec)


def test_engine_checks_before_it_allocates(three_kv):
    """The engine's own checks (for callers that skip validation): before the rotary tables or the cache."""
    with pytest.raises(ConfigError, match=r"^max_model_len: 100000000 is above this model's limit of 512 tokens"):
        make_engine(three_kv, max_model_len=100_000_000)
    with pytest.raises(ConfigError, match=r"^cpu_kv_cache_gib: the KV cache needs [\d.]+ GiB; this machine has"):
        make_engine(three_kv, cpu_kv_cache_gib=1e6)
    with pytest.raises(ConfigError, match=r"^num_kv_blocks: the KV cache needs [\d.]+ GiB; this machine has"):
        make_engine(three_kv, num_kv_blocks=10**12)


def test_text_that_is_not_utf8_is_named():
    check_text("héllo")
    with pytest.raises(InvalidRequestError, match=r"^prompt is not valid UTF-8 \(byte 0xff at character 2\)$"):
        check_text("ab\udcffc")
    with pytest.raises(InvalidRequestError, match=r"^prompt is not valid UTF-8 \(U\+D800 at character 0\)$"):
        check_text("\ud800")



def test_spec_shapes_agree_with_transformers(tiny_checkpoints):
    """The shapes come from config.json itself (model_shape.py); transformers reads the same numbers."""
    from transformers import AutoConfig

    for path in tiny_checkpoints.values():
        spec, cfg = load_model_spec(Path(path)), AutoConfig.from_pretrained(path)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        assert (spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads,
                spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings, spec.tie_word_embeddings) == (
            cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, head_dim, cfg.max_position_embeddings, cfg.tie_word_embeddings), path


@pytest.mark.parametrize("variant, edit, message", [
    ("qwen3-qk-norm", {"head_dim": None}, "lacks required fields: head_dim"),
    ("mistral-sliding-window", {"num_key_value_heads": None}, "lacks required fields: num_key_value_heads"),
    ("llama-gqa-untied", {"torch_dtype": "float64", "dtype": None}, ": dtype 'float64' is not supported"),
    ("llama-gqa-untied", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "rope_parameters": None},
     "rope scaling type 'yarn' is not supported"),
])
def test_config_json_fields_the_shapes_need(tmp_path, tiny_checkpoints, variant, edit, message):
    model = tmp_path / "m"
    shutil.copytree(tiny_checkpoints[variant], model)
    cfg = {**json.loads((model / "config.json").read_text()), **edit}
    (model / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises((ConfigError, UnsupportedModelError), match=re.escape(message)):
        load_model_shape(model)


def test_safetensors_header_that_is_not_json(tmp_path, three_kv):
    model = tmp_path / "m"
    shutil.copytree(three_kv, model)
    (model / "model.safetensors").write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(ConfigError, match=rf"^model: {model}/model.safetensors is not a readable safetensors file "
                                          r"\(its header is not a safetensors header\)$"):
        check_checkpoint(load_model_shape(model))


def test_chat_messages_that_are_not_utf8_are_named():
    from pdserve.engine.tokenizer import Tokenizer

    message = r"^messages\[1\]\.content is not valid UTF-8 \(U\+D800 at character 0\)$"
    with pytest.raises(InvalidRequestError, match=message):
        Tokenizer(None).encode_chat([{"role": "user", "content": "hi"},
                                     {"role": "user", "content": "\ud800"}])
