"""The KV transfer benchmark's CPU smoke run (gloo between two processes): it measures, verifies the moved
blocks, sweeps a staging configuration, and writes what it says it writes. Its traced run: tools/tests."""
import json

import pytest

from pdserve.bench import kv_transfer
from pdserve.kv_transfer.trace import NO_TRACE, start_trace


def test_trace_modes():
    assert start_trace(False, "send", None, "start") is NO_TRACE
    host = start_trace("host", "send", None, "start")
    host.mark("gathered", 0, gpu=True)  # host stamps only: no event, no device time
    rows = host.timeline()
    assert [r["stage"] for r in rows] == ["start", "gathered"]
    assert all(r["device_ns"] is None for r in rows) and rows[1]["k"] == 0


@pytest.mark.timeout(240)
def test_cpu_smoke_run(tmp_path):
    kv_transfer.main(["--device", "cpu", "--sizes", "256", "--iters", "2", "--warmup", "1", "--skip-grpc",
                      "--prefill-lead-ms", "0", "--sweep", "2x1/0@1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "kv_transfer.json").read_text())
    assert record["complete"] and record["copy_sm_fraction"] == 0.5
    (row,) = record["rows"]
    assert row["tokens"] == 256 and row["torch_GBps"] > 0
    assert [r["staging"] for r in record["sweep"]] == ["2x1/0@1+spin"]
