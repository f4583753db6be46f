from pathlib import Path

import pytest
import yaml

from pdserve.cli import main
from pdserve.config import DeploymentConfig, load_config, parse_config
from pdserve.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path, capsys):
    assert main(["config", "validate", str(path)]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_default_yaml_is_the_builtin_default():
    on_disk = load_config(Path(__file__).parent.parent / "configs" / "default.yaml")
    builtin = load_config(None)
    for field in ("model", "dtype", "block_size", "disaggregated", "prefill", "decode", "router"):
        assert getattr(on_disk, field) == getattr(builtin, field)
    assert on_disk == builtin  # every field: the file holds exactly what runs with no -c

    def fields(data: dict, prefix: str = "") -> set[str]:
        return {f"{prefix}{k}" for k in data} | {
            name for k, v in data.items() if isinstance(v, dict) and v for name in fields(v, f"{prefix}{k}.")}

    written = yaml.safe_load((Path(__file__).parent.parent / "configs" / "default.yaml").read_text())
    assert fields(written) == fields(builtin.model_dump())  # and spells every one out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("block_size: 3\n", "block_size: must be a power of two, got 3"),
        ("prefill: {count: 0}\n", "prefill.count: Input should be greater than or equal to 1"),
        ("decode: {tp_size: 0}\n", "decode.tp_size: Input should be greater than or equal to 1"),
        ("router: {grpc_port: 70000}\n", "router.grpc_port: Input should be less than or equal to 65535"),
        ("modle: x\n", "modle: unknown field"),
        ("limits: {max_tokenz: 5}\n", "limits.max_tokenz: unknown field"),
        ("dtype: float64\n", "dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ("gpu_memory_utilization: 1.5\n", "gpu_memory_utilization: Input should be less than or equal to 1"),
        ("- a list\n", "<top level>: expected a mapping, got list"),
        ("max_num_seqs: 64\nmax_num_batched_tokens: 8\n", "max_num_batched_tokens (8) must be >= max_num_seqs"),
        ("model: [unclosed\n", "not valid YAML"),
        ("max_num_seqs: yes\n", "max_num_seqs: Input should be a valid integer, got True"),
        ("limits: {max_tokens: '64'}\n", "limits.max_tokens: Input should be a valid integer, got '64'"),
        ("enable_cuda_graphs: 1\n", "enable_cuda_graphs: Input should be a valid boolean, got 1"),
        ("cpu_kv_cache_gib: true\n", "cpu_kv_cache_gib: Input should be a valid number, got True"),
        ("block_size: 16\nblock_size: 32\n", ":2: block_size: duplicate key"),
        ("router: {grpc_port: 1, http_port: 2}\nrouter: {}\n", ":2: router: duplicate key"),
        ("prefill:\n  count: 1\n  count: 2\n", ":3: prefill.count: duplicate key"),
        ("router: {grpc_port: 9000, http_port: 9000}\n",
         "router: grpc_port and http_port are both 9000; they must differ"),
        ("a: 1\n---\nb: 2\n",
         ":2:1: not valid YAML: expected a single document in the stream, but found another document"),
    ],
)
def test_malformed_config_names_file_and_field(tmp_path, capsys, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert str(bad) in err.value.message and expected in err.value.message
    assert main(["config", "validate", str(bad)]) == 2
    assert expected in capsys.readouterr().err


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dtype: auto\nmodel: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert err.value.message == (f"{bad}:3:1: not valid YAML: expected ',' or ']', but got '<stream end>' "
                                 f"(while parsing a flow sequence)")
    assert "<unicode string>" not in err.value.message


def test_numbers_keep_their_types():
    config = parse_config({"cpu_kv_cache_gib": 2, "decode": {"tp_size": 3}, "router": {"grpc_port": 0, "http_port": 0}})
    assert config.cpu_kv_cache_gib == 2.0 and config.decode.tp_size == 3  # an int is a float; no power-of-two rule
    assert (config.router.grpc_port, config.router.http_port) == (0, 0)  # 0: each picks a free port


def test_relative_model_path_resolves_against_the_file(tmp_path, monkeypatch):
    (tmp_path / "deploy").mkdir()
    path = tmp_path / "deploy" / "x.yaml"
    path.write_text("model: ../models/m\n")
    monkeypatch.chdir("/")
    assert load_config(path).model == str(tmp_path / "models" / "m")
    assert load_config(path, model="rel/m").model == "rel/m"  # the command line's own: the current directory's
    path.write_text(f"model: {tmp_path}/abs\n")
    assert load_config(path).model == f"{tmp_path}/abs"
    path.write_text("dtype: auto\n")
    assert load_config(path).model == "SmolLM2-135M-Instruct"


def test_tokenizer_names_a_folder_or_the_embedded_model(tmp_path):
    from pdserve.engine.model_source import resolve_tokenizer

    path = tmp_path / "x.yaml"
    path.write_text("tokenizer: tok\n")
    (tmp_path / "tok").mkdir()
    config = load_config(path)
    assert config.tokenizer == str(tmp_path / "tok")
    assert resolve_tokenizer(config.tokenizer, tmp_path / "model") == tmp_path / "tok"
    assert resolve_tokenizer(None, tmp_path / "model") == tmp_path / "model"  # the model's own folder
    with pytest.raises(ConfigError, match=r"tokenizer: '/nowhere' is neither a folder nor the embedded model"):
        resolve_tokenizer("/nowhere", tmp_path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_apply_and_validate():
    assert load_config(None, block_size=8).block_size == 8
    assert isinstance(load_config(None), DeploymentConfig)
    with pytest.raises(ConfigError, match="block_size"):
        load_config(None, block_size=6)


def test_overrides_on_a_file_that_is_not_a_mapping_name_the_problem(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="list.yaml: <top level>: expected a mapping, got list"):
        load_config(bad, model="m", dtype=None)
