"""`pdserve bench`'s pure parts against hand-computed cases: arrivals, percentiles, SLO attainment,
goodput, workloads and the Mooncake trace parser, the load generator over a fake backend."""
from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest

from pdserve.bench.serving import workloads as w
from pdserve.bench.serving.backends import RequestResult
from pdserve.bench.serving.loadgen import LoadSpec, arrival_gaps, run_load, send_times
from pdserve.bench.serving.metrics import SLO, attainment, distribution, goodput, summarize


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_gamma_arrivals_have_the_rate_and_cv(burstiness, cv):
    gaps = arrival_gaps(200_000, rate=8.0, burstiness=burstiness, seed=3)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.03)


def test_poisson_counts_per_second_have_poisson_variance():
    times = np.cumsum(arrival_gaps(100_000, rate=20.0, seed=1))
    counts = np.bincount(times.astype(int))[:-1]  # requests per whole second
    assert counts.mean() == pytest.approx(20.0, rel=0.02)
    assert counts.var() == pytest.approx(20.0, rel=0.1)  # Poisson: variance = mean


def test_arrivals_are_seeded_and_infinite_rate_sends_at_once():
    assert np.array_equal(arrival_gaps(50, 3.0, seed=7), arrival_gaps(50, 3.0, seed=7))
    assert not np.array_equal(arrival_gaps(50, 3.0, seed=7), arrival_gaps(50, 3.0, seed=8))
    assert arrival_gaps(5, math.inf).tolist() == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_gaps(5, 0.0)


def test_send_times_start_at_zero_and_follow_a_trace():
    reqs = w.random_requests(4, 3, 2, vocab_size=50)
    times = send_times(reqs, LoadSpec(rate=2.0, seed=5))
    gaps = arrival_gaps(4, 2.0, seed=5)
    assert times[0] == 0.0 and times[1:] == pytest.approx(np.cumsum(gaps[1:]).tolist())
    traced = [w.BenchRequest([5], 1, t) for t in (0.0, 0.5, 2.0)]
    assert send_times(traced, LoadSpec(rate=100.0)) == [0.0, 0.5, 2.0]
    assert send_times(traced[1:], LoadSpec(rate=100.0)) == [0.0, 1.5]  # after a warm-up: from the first sent


def test_distribution_percentiles_by_hand():
    d = distribution("ttft", [0.004, 0.001, 0.003, 0.002])  # seconds -> ms
    assert d["mean_ttft_ms"] == pytest.approx(2.5)
    assert d["median_ttft_ms"] == pytest.approx(2.5) and d["p50_ttft_ms"] == pytest.approx(2.5)
    assert d["p90_ttft_ms"] == pytest.approx(1 + 0.9 * 3)  # linear between order statistics
    assert d["p99_ttft_ms"] == pytest.approx(1 + 0.99 * 3)
    assert d["std_ttft_ms"] == pytest.approx(np.std([1, 2, 3, 4]))


def _result(ttft, out, tpot=None, error=None):
    e2e = None if ttft is None else ttft + (out - 1) * (tpot or 0.0)
    return RequestResult(prompt_len=10, output_len=out, ttft_s=ttft, e2e_s=e2e, error=error,
                         itl_s=[tpot] * (out - 1) if tpot else [])


RESULTS = [
    _result(0.050, 11, tpot=0.010),  # meets: 50 ms, 10 ms
    _result(0.150, 11, tpot=0.010),  # TTFT over 100 ms
    _result(0.050, 11, tpot=0.030),  # TPOT over 20 ms
    _result(None, 0, error="http_500"),  # failed: a miss
    _result(0.090, 1),  # one token: no TPOT, meets
]


def test_slo_attainment_and_summary_by_hand():
    slo = SLO(ttft_ms=100, tpot_ms=20)
    assert [slo.met(r) for r in RESULTS] == [True, False, False, False, True]
    assert attainment(RESULTS, slo) == pytest.approx(2 / 5)
    s = summarize(RESULTS, duration_s=2.0, slo=slo)
    assert (s["completed"], s["failed"], s["errors"]) == (4, 1, {"http_500": 1})
    assert s["total_output_tokens"] == 34 and s["total_input_tokens"] == 40
    assert s["request_throughput"] == pytest.approx(2.0) and s["output_throughput"] == pytest.approx(17.0)
    assert s["slo_attainment"] == pytest.approx(0.4) and s["request_goodput"] == pytest.approx(1.0)
    assert s["mean_tpot_ms"] == pytest.approx((10 + 10 + 30) / 3)
    assert s["mean_ttft_ms"] == pytest.approx((50 + 150 + 50 + 90) / 4)
    assert s["p99_itl_ms"] == pytest.approx(30.0) and s["median_itl_ms"] == pytest.approx(10.0)
    json.dumps(s)  # plain JSON


def test_goodput_is_the_highest_rate_before_the_first_miss():
    sweep = [(8, 0.5), (1, 1.0), (4, 0.9), (2, 0.95), (16, 0.95)]
    assert goodput(sweep) == 4  # 16 passes again, past a miss: noise, not goodput
    assert goodput([(1, 0.89)]) is None
    assert goodput([(1, 1.0), (2, 0.91)]) == 2
    assert goodput([(1, 0.5), (2, 0.5)], target=0.5) == 2


def test_workloads_are_seeded_and_have_their_lengths():
    a, b = w.random_requests(8, 12, 5, 100, seed=1), w.random_requests(8, 12, 5, 100, seed=1)
    assert a == b and a != w.random_requests(8, 12, 5, 100, seed=2)
    assert all(r.prompt_len == 12 and r.output_len == 5 for r in a)
    assert all(w.FIRST_ID <= t < 100 for r in a for t in r.prompt_ids)
    ranged = w.random_requests(200, 100, 10, 100, seed=0, range_ratio=0.5)
    assert {r.prompt_len for r in ranged} <= set(range(50, 151)) and len({r.prompt_len for r in ranged}) > 20
    long = w.long_prompt_requests(3, 100, output_len=16)
    assert all(4096 <= r.prompt_len <= 16384 and r.output_len == 16 for r in long)
    shared = w.shared_prefix_requests(6, 2, 8, 3, 4, 100)
    assert shared[0].prompt_ids[:8] == shared[2].prompt_ids[:8] != shared[1].prompt_ids[:8]
    assert shared[0].prompt_ids[8:] != shared[2].prompt_ids[8:] and shared[0].prompt_len == 11


def test_sharegpt_mix_follows_the_published_means():
    reqs = w.sharegpt_requests(20_000, 1000, seed=0)
    ins, outs = np.array([r.prompt_len for r in reqs]), np.array([r.output_len for r in reqs])
    assert ins.mean() == pytest.approx(w.SHAREGPT_MEAN_INPUT, rel=0.05)
    assert outs.mean() == pytest.approx(w.SHAREGPT_MEAN_OUTPUT, rel=0.05)
    assert ins.max() <= 1024 and (ins + outs).max() <= 2048 and min(ins.min(), outs.min()) >= 4


def test_mooncake_trace_parses_and_replays(tmp_path):
    lines = [{"timestamp": 1000, "input_length": 700, "output_length": 5, "hash_ids": [7, 8]},
             {"timestamp": 1500, "input_length": 300, "output_length": 2, "hash_ids": [7]},
             {"timestamp": 4000, "input_length": 1100, "output_length": 0, "hash_ids": [9, 10]}]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    records = w.load_mooncake_trace(path)
    assert records[1] == w.TraceRecord(1500.0, 300, 2, (7,))
    reqs = w.trace_requests(records, vocab_size=100, seed=3)
    assert [r.prompt_len for r in reqs] == [700, 300, 1100]
    assert [r.output_len for r in reqs] == [5, 2, 1]  # at least one token asked
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 3.0]
    assert reqs[0].prompt_ids[:300] == reqs[1].prompt_ids  # hash id 7: the same block in both
    assert reqs[0].prompt_ids[:512] != reqs[2].prompt_ids[:512]
    assert reqs == w.trace_requests(records, vocab_size=100, seed=3)
    path.write_text('{"timestamp": 1, "input_length": 2}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:1"):
        w.load_mooncake_trace(path)


class FakeBackend:
    """Answers each request after `delay_s` with its tokens; records the peak of requests in flight."""

    def __init__(self, delay_s: float):
        self.delay_s, self.in_flight, self.peak, self.sent = delay_s, 0, 0, []

    async def send(self, req):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.sent.append(req)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        return RequestResult(req.prompt_len, req.output_len, ttft_s=self.delay_s / 2, e2e_s=self.delay_s)

    async def close(self):
        pass


def test_closed_loop_holds_its_concurrency_and_leaves_out_the_warmup():
    backend, reqs = FakeBackend(0.01), w.random_requests(23, 4, 3, 50)
    run = asyncio.run(run_load(backend, reqs, LoadSpec(max_concurrency=4, warmup=3, progress=False)))
    assert len(run.results) == 20 and run.num_unfinished == 0 and backend.peak == 4
    assert backend.sent[:3] == reqs[:3] and len(backend.sent) == 23
    backend = FakeBackend(0.01)
    asyncio.run(run_load(backend, reqs[:10], LoadSpec(rate=1e6, max_concurrency=2, warmup=6, progress=False)))
    assert backend.peak == 2 and len(backend.sent) == 10  # the warm-up too keeps to max_concurrency


def test_time_bound_cuts_the_run():
    backend, reqs = FakeBackend(0.05), w.random_requests(100, 4, 3, 50)
    run = asyncio.run(run_load(backend, reqs, LoadSpec(rate=100.0, duration_s=0.3, progress=False)))
    assert 10 < len(run.results) < 40 and run.num_unfinished == 100 - len(run.results)
    assert run.duration_s == pytest.approx(0.3, abs=0.15)


def test_sse_lines_count_chunks_and_take_usage():
    from pdserve.bench.serving.backends import OpenAIBackend, _Timer

    timer = _Timer(RequestResult(prompt_len=3))
    lines = ['data: {"choices":[{"text":"ab","index":0}]}', "", ": keep-alive",
             'data: {"choices":[{"text":"","index":0}]}',  # no content: not a token
             'data: {"choices":[{"delta":{"content":"c"},"index":0}]}',
             'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}', "data: [DONE]"]
    usage = [OpenAIBackend._line(line, timer) for line in lines]
    assert usage == [None] * 5 + [5, None]
    assert timer.result.output_len == 2 and len(timer.result.itl_s) == 1 and timer.result.ttft_s is not None
    OpenAIBackend._line('data: {"error":{"message":"boom"}}', timer)
    assert timer.result.error == "stream_error"


def test_targets_from_arguments():
    from pdserve.bench.serving.compare import labels
    from pdserve.bench.serving.target import Target, is_url, parse_overrides, url_target

    assert url_target("http://h:8000") == Target("http://h:8000", http_url="http://h:8000")
    assert url_target("h:50051") == Target("h:50051", grpc_address="h:50051")
    assert not is_url("configs/colocated.yaml") and is_url("h:1")
    assert labels(["configs/cpu-1p1d.yaml", "x/colocated.yaml"]) == ["cpu-1p1d", "colocated"]
    assert labels(["a/c.yaml", "b/c.yaml"]) == ["A:c", "B:c"]
    assert parse_overrides(["disaggregated=false", "prefill={count: 2}"]) == {"disaggregated": False,
                                                                            "prefill": {"count": 2}}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["model"])
    with pytest.raises(ValueError, match="no address for the openai backend"):
        url_target("h:1").url_for("openai")


def test_text_prompts_encode_to_exactly_their_lengths(embedded_dir):
    from transformers import AutoTokenizer

    from pdserve.bench.serving.backends import OpenAIBackend

    tok = AutoTokenizer.from_pretrained(embedded_dir).backend_tokenizer
    reqs = w.shared_prefix_requests(6, 2, 40, 25, 8, 100_000, seed=2)
    texts = w.as_text(reqs, tok)
    for r, t in zip(reqs, texts):
        assert (t.prompt_ids, t.output_len) == (r.prompt_ids, r.output_len)
        assert len(tok.encode(t.prompt_text, add_special_tokens=False).ids) == r.prompt_len == 65
    assert texts[0].prompt_text.split()[:40] == texts[2].prompt_text.split()[:40]  # a shared prefix stays shared
    assert texts[0].prompt_text.split()[:40] != texts[1].prompt_text.split()[:40]
    body = OpenAIBackend("http://127.0.0.1:1", ignore_eos=False).body(texts[0])
    assert body["prompt"] == texts[0].prompt_text and "ignore_eos" not in body
    assert OpenAIBackend("http://127.0.0.1:1").body(reqs[0])["prompt"] == reqs[0].prompt_ids


def test_text_prompts_need_a_tokenizer_with_words():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="the tokenizer has 0 plain-word tokens; text prompts need at least 100"):
        w.as_text(w.random_requests(1, 4, 1, 100), tok)
