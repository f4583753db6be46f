"""The router's Prometheus collectors: names, the API the core calls, the text format's own parser."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.messages import StepTiming
from pdserve.router.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple, float]:
    families = list(text_string_to_metric_families(metrics.expose().decode()))
    assert families and all(f.name.startswith("pdserve_") for f in families)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_every_call_moves_its_series():
    m = Metrics()
    m.first_token(0.03)
    m.tokens(4, 0.02)  # four tokens in one delta, 80 ms after the previous one: 20 ms each
    m.request_finished("stop", prompt_tokens=12, completion_tokens=5, e2e_s=0.4)
    m.request_finished("length", prompt_tokens=3, completion_tokens=16, e2e_s=1.5)
    m.error("resource_exhausted")
    m.transfer(True, 1 << 20, 0.002)
    m.transfer(False, 0, 1.0)
    m.set_queue_depth(7)
    m.stages({"queued": 0.002, "prefilling": 0.1, "decoding": 1.25})
    m.steps("decode", [StepTiming(0.006, 64, 64, True), StepTiming(0.004, 1, 1, True)])
    m.steps("prefill", [StepTiming(0.2, 3, 4096, False)])
    m.set_worker("decode", "decode-0", running=3, waiting=1, blocks_used=40, blocks_total=128, preemptions=1)
    s = samples(m)
    assert s[("pdserve_time_to_first_token_seconds_count", ())] == 1
    assert s[("pdserve_inter_token_latency_seconds_count", ())] == 4
    assert s[("pdserve_inter_token_latency_seconds_bucket", (("le", "0.02"),))] == 4
    assert s[("pdserve_inter_token_latency_seconds_bucket", (("le", "0.015"),))] == 0
    assert s[("pdserve_e2e_request_latency_seconds_sum", ())] == pytest.approx(1.9)
    assert s[("pdserve_requests_total", (("finish_reason", "stop"),))] == 1
    assert s[("pdserve_requests_total", (("finish_reason", "length"),))] == 1
    assert s[("pdserve_prompt_tokens_total", ())] == 15 and s[("pdserve_generation_tokens_total", ())] == 21
    assert s[("pdserve_request_errors_total", (("kind", "resource_exhausted"),))] == 1
    assert s[("pdserve_kv_transfers_total", ())] == 2 and s[("pdserve_kv_transfer_failures_total", ())] == 1
    assert s[("pdserve_kv_transfer_bytes_total", ())] == 1 << 20
    assert s[("pdserve_kv_transfer_seconds_count", ())] == 1
    assert s[("pdserve_queue_depth", ())] == 7 and s[("pdserve_preemptions_total", ())] == 1
    assert s[("pdserve_request_stage_seconds_sum", (("stage", "decoding"),))] == 1.25
    assert s[("pdserve_request_stage_seconds_count", (("stage", "prefilling"),))] == 1
    decode, prefill = (("phase", "decode"), ("role", "decode")), (("phase", "prefill"), ("role", "prefill"))
    assert s[("pdserve_engine_step_seconds_count", decode)] == 2
    assert s[("pdserve_engine_step_seconds_sum", decode)] == pytest.approx(0.01)
    assert s[("pdserve_engine_step_seconds_count", prefill)] == 1
    worker = (("role", "decode"), ("worker", "decode-0"))
    assert s[("pdserve_worker_running_requests", worker)] == 3 and s[("pdserve_worker_waiting_requests", worker)] == 1
    assert s[("pdserve_kv_blocks_used", worker)] == 40 and s[("pdserve_kv_blocks_total", worker)] == 128
    m.remove_worker("decode", "decode-0")
    m.remove_worker("prefill", "never-reported")
    assert ("pdserve_kv_blocks_used", worker) not in samples(m)


def test_registries_are_separate():
    a, b = Metrics(), Metrics()  # a second server in the process must not collide with the first
    a.set_worker("decode", "decode-0", 0, 0, 0, 8, preemptions=3)
    assert samples(a)[("pdserve_preemptions_total", ())] == 3
    assert samples(b)[("pdserve_preemptions_total", ())] == 0


def test_preemptions_count_what_each_worker_reports_new():
    m = Metrics()
    for role, name, total in [("decode", "d0", 2), ("decode", "d0", 2), ("decode", "d0", 5), ("colocated", "c0", 1),
                              ("decode", "d0", 1)]:  # the last: d0 replaced by a new worker of that name
        m.set_worker(role, name, 0, 0, 0, 8, preemptions=total)
    assert samples(m)[("pdserve_preemptions_total", ())] == 5 + 1 + 1
