"""The tools run: each answers --help, and the KV trace tool's CPU smoke run traces and profiles."""
import json
import pathlib
import subprocess
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1]
TOOL_SCRIPTS = ["all_reduce", "gemm", "host", "kv_pipeline", "kv_trace"]


def test_every_tool_answers_help():
    assert sorted(p.stem for p in TOOLS.glob("*.py")) == sorted([*TOOL_SCRIPTS, "kv_probe", "kv_timeline"])
    procs = {name: subprocess.Popen([sys.executable, str(TOOLS / f"{name}.py"), "--help"], text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in TOOL_SCRIPTS}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {err}"
        assert out.startswith("usage: "), name


@pytest.mark.timeout(240)
def test_kv_trace_cpu_smoke_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # as `python tools/kv_trace.py` has it (the spawned processes too)
    import kv_trace

    kv_trace.main(["--device", "cpu", "--sizes", "256", "--iters", "2", "--warmup", "1", "--skip-grpc",
                   "--prefill-lead-ms", "0", "--trace", "host", "--profile", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "kv_transfer.json").read_text())
    assert record["complete"] and set(record["host_latencies"]) == {"receiver", "sender"}
    (row,) = record["rows"]
    assert row["tokens"] == 256 and row["torch_GBps"] > 0 and row["trace"]["timeline"]
    for side in ("sender", "receiver"):
        profile = json.loads((tmp_path / f"kv_profile_{side}_256.json").read_text())
        assert any(e.get("name") == "gloo:send" or e.get("name") == "gloo:recv" for e in profile["traceEvents"])
