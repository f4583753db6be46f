"""The colocated worker: prefill and decode in one engine (chunked prefill mixed into decode batches), the
baseline every disaggregated figure is compared with. Same router, same reports."""
from __future__ import annotations

from pdserve.cluster.engine_worker import EngineWorker
from pdserve.engine.sampling_params import SamplingParams


class ColocatedWorker(EngineWorker):
    role = "colocated"

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.call(lambda: self.engine.add_request(prompt_token_ids, params, request_id))
