"""`pdserve bench serve` and `pdserve bench compare` end to end on CPU: deployments of a tiny model with random
weights (`load_format: dummy`) started in this process, a short rate sweep, JSON and PNGs that open."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib.image
import pytest
import ray

from pdserve.bench.serving.tiny_model import write_tiny_model
from pdserve.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_overrides(tmp_path_factory):
    """`--set` arguments that shrink any deployment to the tiny model on CPU; one Ray for the module."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    model = write_tiny_model(tmp_path_factory.mktemp("bench") / "tiny")
    sets = [f"model={model}", "load_format=dummy", "device=cpu", "dtype=float32", "num_kv_blocks=128"]
    yield [arg for s in sets for arg in ("--set", s)]
    if started:
        ray.shutdown()


def _assert_pngs_open(doc: dict, count: int):
    assert len(doc["plots"]) == count
    for png in doc["plots"]:
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0


def test_bench_serve_writes_json_and_plots(tiny_overrides, tmp_path, capsys):
    rc = main(["bench", "serve", "--backend", "grpc", "--set", "disaggregated=false", *tiny_overrides,
               "--num-prompts", "10", "--warmup", "2", "--input-len", "24", "--output-len", "8",
               "--request-rate", "4,inf", "--slo-ttft-ms", "5000", "--slo-tpot-ms", "2000", "--seed", "1",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    [dep] = doc["deployments"]
    assert [r["request_rate"] for r in dep["runs"]] == [4.0, "inf"]
    for run in dep["runs"]:
        assert (run["completed"], run["failed"]) == (10, 0)
        assert run["total_input_tokens"] == 240 and run["total_output_tokens"] == 80
        assert 0 < run["mean_ttft_ms"] <= run["p99_ttft_ms"] and run["p99_itl_ms"] > 0
        assert run["request_throughput"] > 0 and run["slo_attainment"] == 1.0 and len(run["ttfts"]) == 10
    assert dep["goodput"] == 4.0  # the only finite rate swept, all requests within the loose SLOs
    _assert_pngs_open(doc, 3)
    assert "goodput: 4.000" in capsys.readouterr().out


def test_bench_compare_cpu_1p1d_and_colocated(tiny_overrides, tmp_path, capsys):
    rc = main(["bench", "compare", str(CONFIGS / "cpu-1p1d.yaml"), str(CONFIGS / "colocated.yaml"), *tiny_overrides,
               "--num-prompts", "8", "--input-len", "40", "--output-len", "6", "--request-rate", "2,8",
               "--slo-ttft-ms", "5000", "--slo-tpot-ms", "2000", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    doc = json.loads((tmp_path / "compare.json").read_text())
    assert [d["label"] for d in doc["deployments"]] == ["cpu-1p1d", "colocated"]
    for dep in doc["deployments"]:
        assert [(r["completed"], r["failed"], r["total_output_tokens"]) for r in dep["runs"]] == [(8, 0, 48)] * 2
    ratios = doc["ratios"]
    assert ratios["goodput"] == pytest.approx(1.0)  # both meet the loose SLOs at every rate
    assert [row["request_rate"] for row in ratios["by_load"]] == [2.0, 8.0]
    a, b = (d["runs"][1] for d in doc["deployments"])
    assert ratios["by_load"][1]["mean_ttft_ms"] == pytest.approx(b["mean_ttft_ms"] / a["mean_ttft_ms"])
    _assert_pngs_open(doc, 4)
    out = capsys.readouterr().out
    assert "== colocated ÷ cpu-1p1d: goodput 1.000" in out
    (tmp_path / "compare_ratios.png").unlink()
    assert main(["bench", "plot", str(tmp_path / "compare.json")]) == 0  # drawn again from the JSON alone
    _assert_pngs_open(json.loads((tmp_path / "compare.json").read_text()), 4)
