"""The prefill worker's own bookkeeping, in this process: a transfer that never ends (whatever became of the
thread moving it) is ended by the worker past its deadline, and the blocks it held come back."""
from __future__ import annotations

import time

from serving_support import tiny_config

from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.prefill_worker.worker import STUCK_GRACE_S, PrefillWorker, _Send


def test_a_transfer_that_never_ends_is_ended_past_its_deadline(path):
    config = tiny_config(path, kv_transfer={"transport": "gloo", "timeout_s": 0.2})
    worker = PrefillWorker(config.model_dump(), "prefill-test")
    worker.engine = LLMEngine(worker.config)
    worker.setup()
    kv = worker.engine.kv
    worker.engine.kv_saver = None  # the request's blocks are held, but no transfer starts for it
    try:
        rid = worker.engine.add_request(list(range(5, 40)), SamplingParams(max_tokens=1), "r1", hold_blocks=True)
        while worker.engine.has_unfinished():
            worker.engine.step()
        assert rid in worker.engine.held and kv.num_free_blocks < kv.num_blocks
        # as `begin` books it, but its sender never reports on it
        worker.sending[7] = _Send(rid, 1, time.monotonic() + config.kv_transfer.timeout_s + STUCK_GRACE_S)
        worker.before_step()
        assert 7 in worker.sending  # its deadline is not past yet
        worker.sending[7].deadline = time.monotonic()
        time.sleep(0.01)
        worker.before_step()
        assert worker.sending == {} and worker.engine.held == {} and kv.num_free_blocks == kv.num_blocks
        [failure] = worker._failures
        assert (failure.request_id, failure.code, failure.retry) == (rid, "UNAVAILABLE", True)
        assert failure.message == "KV transfer failed: it did not end within its deadline"
        [outcome] = worker._transfers
        assert (outcome.request_id, outcome.ok) == (rid, False)
    finally:
        worker.teardown()
