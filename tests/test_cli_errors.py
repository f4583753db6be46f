"""Every mistake a user can make at the command line or in a deployment file, through the real CLI in a
subprocess: exit status 2, exactly one `error:` line on stderr (so no traceback), nothing on stdout, within
10 s (30 s where a Ray cluster starts), and no process of the run left behind (docs/decisions.md lists them).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import add_byte_tokenizer, make_tiny_checkpoint

LIMIT_S = 10.0
TP_LIMIT_S = 30.0  # starts (and stops) a local Ray cluster
MARKER = "PDSERVE_TEST_RUN"  # every process a run starts inherits it: what is left over is found by it


def leftover_processes(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if f"{MARKER}={token}".encode() in environ.split(b"\0"):
            found.append(int(pid))
    return found


def assert_nothing_left(token: str) -> None:
    deadline = time.monotonic() + 10  # Ray's processes stop a moment after the driver exits
    while (left := leftover_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left running: {left}"


def run_cli(*args, limit: float = LIMIT_S, cwd=None) -> subprocess.CompletedProcess:
    token = uuid.uuid4().hex
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, MARKER: token}, timeout=limit + 60)
    elapsed = time.monotonic() - start
    assert_nothing_left(token)
    assert elapsed < limit, f"took {elapsed:.1f}s: {proc.stderr}"
    return proc


def assert_error(proc: subprocess.CompletedProcess, line: str) -> None:
    """Exit 2, nothing on stdout, and stderr is exactly `line` (a regex when it is a compiled pattern)."""
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    if isinstance(line, re.Pattern):
        assert line.fullmatch(proc.stderr), proc.stderr
    else:
        assert proc.stderr == line + "\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny model with a tokenizer, and broken copies of it."""
    root = tmp_path_factory.mktemp("cli-models")
    good = root / "good"
    make_tiny_checkpoint(good, "llama-gqa-untied", eos_token_id=None)  # no EOS: runs stop by length only
    add_byte_tokenizer(good)

    def copy(name: str) -> Path:
        shutil.copytree(good, root / name)
        return root / name

    zero, truncated, bad_json, wrong_shape, lacking = map(copy, ["zero", "truncated", "bad-json", "shape", "lacks"])
    (zero / "model.safetensors").write_bytes(b"")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad_json / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n')
    for folder, edit in [(wrong_shape, {"intermediate_size": 96}),
                         (lacking, {"hidden_size": None, "vocab_size": None})]:
        cfg = {**json.loads((folder / "config.json").read_text()), **edit}
        (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    three_kv = make_tiny_checkpoint(root / "three-kv", "llama-gqa-untied", num_key_value_heads=3,
                                    num_attention_heads=6, hidden_size=96, intermediate_size=96)
    return {"good": good, "zero": zero, "truncated": truncated, "bad-json": bad_json, "shape": wrong_shape,
            "lacks": lacking, "three-kv": Path(three_kv), "root": root}


def deployment(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- model folders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, message", [
    ("zero", "{p}/model.safetensors is not a readable safetensors file (0 bytes: no whole header)"),
    ("truncated", "{p}/model.safetensors is not a readable safetensors file (truncated: its header describes "
                  "{full} bytes, the file has {half})"),
    ("bad-json", "{p}/config.json is not valid JSON (line 2, column 1: Expecting property name enclosed in "
                 "double quotes)"),
    ("shape", "model.safetensors holds layers.0.mlp.down_proj.weight of shape [64, 128], but {p}/config.json "
              "implies [64, 96]: the config does not match the weights"),
    ("lacks", "{p}/config.json lacks required fields: vocab_size, hidden_size"),
])
def test_broken_model_folder_is_one_line(models, name, message):
    proc = run_cli("generate", "--model", str(models[name]), "hi")
    full = (models["good"] / "model.safetensors").stat().st_size
    assert_error(proc, "error: model: " + message.format(p=models[name], full=full, half=full // 2))


def test_broken_weights_fail_validation_too(models, tmp_path):
    path = deployment(tmp_path, f"model: {models['zero']}\n")
    assert_error(run_cli("config", "validate", str(path)),
                 f"error: {path}: model: {models['zero']}/model.safetensors is not a readable safetensors file "
                 f"(0 bytes: no whole header)")


# --- the command line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_prompt_that_is_not_utf8(models, chat):
    proc = run_cli("generate", "--model", str(models["good"]), *(["--chat"] if chat else []), b"h\xffi")
    assert_error(proc, "error: prompt is not valid UTF-8 (byte 0xff at character 1)")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_tp_that_is_not_a_positive_integer(value):
    shown = repr(value) if value == "two" else value
    assert_error(run_cli("generate", "--tp", value, "hi"),
                 f"error: pdserve generate: argument --tp: must be a positive integer, got {shown} "
                 f"(see pdserve generate --help)")


def test_usage_error_is_one_line():
    assert_error(run_cli("generate"),
                 "error: pdserve generate: the following arguments are required: prompt (see pdserve generate --help)")


def test_tp_the_model_cannot_split(models):
    assert_error(run_cli("generate", "--model", str(models["three-kv"]), "--tp", "4", "hi"),
                 "error: --tp: 4 ranks cannot run this model: more ranks than its 3 kv heads must be a multiple of "
                 "them, each head's 2 query heads split evenly over its ranks (sizes that can: 1, 2, 3, 6)")


def test_tp_beyond_the_cluster_fails_in_bounded_time(models, tmp_path):
    """More ranks than the local Ray cluster has CPUs: an error naming what is missing, not a wait."""
    tp = (os.cpu_count() or 1) + 1
    wide = make_tiny_checkpoint(tmp_path / "wide", "llama-gqa-untied", num_key_value_heads=tp,
                                num_attention_heads=tp, hidden_size=16 * tp, intermediate_size=8 * tp)
    add_byte_tokenizer(wide)
    proc = run_cli("generate", "--device", "cpu", "--model", wide, "--tp", str(tp), "hi", limit=TP_LIMIT_S)
    assert_error(proc, re.compile(rf"error: tp {tp} needs {tp} CPUs, the cluster has \d+\n"))


def test_max_tokens_above_the_limit(models):
    assert_error(run_cli("generate", "--model", str(models["good"]), "--max-tokens", "1000000000", "hi"),
                 "error: --max-tokens: 1000000000 is above limits.max_tokens (4096)")


def test_stop_at_max_model_len_says_so(models):
    """Not an error: the completion is printed, and a notice on stderr says why it stopped."""
    folder = models["root"] / "deployments"
    folder.mkdir(exist_ok=True)
    path = deployment(folder, "model: ../good\ndevice: cpu\ndtype: float32\nmax_model_len: 16\n"
                              "cpu_kv_cache_gib: 0.01\n", name="len.yaml")
    proc = run_cli("generate", "-c", str(path), "--max-tokens", "100", "hello", cwd=folder.parent.parent,
                   limit=60)  # a whole run, not an error: no 10 s bound
    assert proc.returncode == 0 and proc.stdout.endswith("\n"), proc.stderr
    assert proc.stderr == "finish_reason: length (prompt 5 + completion 11 tokens reached max_model_len 16)\n"


# --- deployment files ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, problem", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "not a YAML text file: byte 0x89 at offset 0 is not UTF-8"),
    (b"model: \x00\x01\n", "not a YAML text file: character U+0000 at offset 7 is not allowed"),
], ids=["not-utf8", "binary"])
@pytest.mark.parametrize("command", ["validate", "generate"])
def test_deployment_file_that_is_not_text(tmp_path, content, problem, command):
    path = tmp_path / "deploy.yaml"
    path.write_bytes(content)
    args = ["config", "validate", str(path)] if command == "validate" else ["generate", "-c", str(path), "hi"]
    assert_error(run_cli(*args), f"error: {path}: {problem}")


@pytest.mark.parametrize("command", ["validate", "generate"])
def test_kv_cache_larger_than_memory(models, tmp_path, command):
    path = deployment(tmp_path, f"model: {models['good']}\ndevice: cpu\ncpu_kv_cache_gib: 1000000\n")
    args = ["config", "validate", str(path)] if command == "validate" else ["generate", "-c", str(path), "hi"]
    ranks = 2 if command == "validate" else 1  # a prefill and a decode worker; generate's one engine
    assert_error(run_cli(*args), re.compile(
        rf"error: {re.escape(str(path))}: cpu_kv_cache_gib: {ranks} rank\(s\) need {ranks * 1000000}\.0 GiB of KV "
        rf"cache; this machine has \d+\.\d GiB available\n"))


@pytest.mark.parametrize("command", ["validate", "generate", "serve"])
def test_max_model_len_above_the_model(models, tmp_path, command):
    path = deployment(tmp_path, f"model: {models['good']}\ndevice: cpu\nmax_model_len: 100000000\n")
    args = {"validate": ["config", "validate", str(path)], "generate": ["generate", "-c", str(path), "hi"],
            "serve": ["serve", "-c", str(path)]}[command]  # serve validates before a worker starts
    assert_error(run_cli(*args), f"error: {path}: max_model_len: 100000000 is above this model's limit of 512 "
                                 f"tokens (max_position_embeddings in {models['good']}/config.json)")


@pytest.mark.parametrize("text, problem", [
    ("decode: {tp_size: 4}\n", "decode.tp_size: 4 ranks cannot run this model: more ranks than its 3 kv heads "
                               "must be a multiple of them, each head's 2 query heads split evenly over its ranks "
                               "(sizes that can: 1, 2, 3, 6)"),
    ("max_num_seqs: yes\n", "max_num_seqs: Input should be a valid integer, got True"),
    ("block_size: 16\nblock_size: 32\n", None),
    ("router: {grpc_port: 9000, http_port: 9000}\n", "router: grpc_port and http_port are both 9000; they must differ"),
    ("max_model_len: [1\n", None),
], ids=["tp-over-kv-heads", "yes-for-int", "duplicate-key", "same-ports", "yaml-syntax"])
def test_validate_names_file_and_field(models, tmp_path, text, problem):
    path = deployment(tmp_path, f"model: {models['three-kv']}\nload_format: dummy\ndevice: cpu\n" + text)
    expected = {
        "block_size: 16\nblock_size: 32\n": f"{path}:5: block_size: duplicate key",
        "max_model_len: [1\n": f"{path}:5:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
                               f"(while parsing a flow sequence)",
    }.get(text, f"{path}: {problem}")
    assert_error(run_cli("config", "validate", str(path)), f"error: {expected}")


def test_relative_model_path_resolves_against_the_file(models, tmp_path):
    folder = tmp_path / "deployments"
    folder.mkdir()
    path = deployment(folder, f"model: {os.path.relpath(models['good'], folder)}\ndevice: cpu\n")
    proc = run_cli("config", "validate", str(path), cwd=tmp_path.parent)  # not the file's folder
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "ok\n", "")


# --- Ctrl-C -----------------------------------------------------------------------------------------------
def interrupted(args: list[str], wait_for: str | None, delay: float = 0.0) -> tuple[int, str, float]:
    """Start the CLI, send SIGINT once `wait_for` shows on stderr (or after `delay`); its exit status, what it
    wrote to stderr after the signal, and how long it took to exit."""
    token = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, MARKER: token})
    try:
        if wait_for is not None:
            while wait_for not in (line := proc.stderr.readline()):
                assert line, "exited before the line it was to be interrupted after"
        time.sleep(delay)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert_nothing_left(token)
    return proc.returncode, rest, took


def test_ctrl_c_during_generation_exits_130_quietly(models, tmp_path):
    long = make_tiny_checkpoint(tmp_path / "long", "llama-gqa-untied", eos_token_id=None,
                                max_position_embeddings=8192)
    add_byte_tokenizer(long)
    path = deployment(tmp_path, f"model: {long}\ndevice: cpu\ncpu_kv_cache_gib: 0.05\n")
    status, rest, took = interrupted(["-v", "generate", "-c", str(path), "--max-tokens", "4000", "hi"],
                                     wait_for="generating up to 4000 tokens", delay=0.5)
    assert (status, rest) == (130, "") and took < LIMIT_S


def test_ctrl_c_while_loading_exits_130_quietly(models):
    status, rest, took = interrupted(["-v", "generate", "--model", str(models["good"]), "hi"],
                                     wait_for="INFO pdserve.cli: loading")
    assert (status, rest) == (130, "") and took < LIMIT_S
