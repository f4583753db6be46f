"""The prefill worker: computes prompts (batched under the token budget, long ones chunked), reports each
first token at once, and ships each prompt's KV to the decode blocks the router reserved for it.

A prompt's blocks outlive its request until its transfer ends, done or failed (a delayed free). The
transfer starts with the step that completes the prompt, and each layer is marked written as the model
finishes it, so the KV moves while later layers still compute.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

from pdserve.cluster.engine_worker import EngineWorker
from pdserve.cluster.transfer import make_transfer_config
from pdserve.engine.request import Request
from pdserve.errors import ErrorCode, TransferError
from pdserve.kv_transfer import KVLayout, KVSender, TransferState
from pdserve.messages import KVTarget, PrefillTask


class PrefillWorker(EngineWorker):
    role = "prefill"

    def setup(self) -> None:
        runner = self.engine.runner
        layout = KVLayout.of_cache(runner.kv_cache, self.config.model, self.engine.spec.num_kv_heads, 1, 0)
        # Source blocks are freed by the loop when the transfer's result is collected (below), not from the
        # sender's thread: the engine is the loop's alone.
        self.sender = KVSender(layout, runner.kv_cache, lambda ids: None, config=make_transfer_config(self.config))
        self.engine.kv_saver = self
        self.targets: dict[str, KVTarget] = {}  # queued or prefilling
        self.real_params: dict[str, object] = {}
        self.sending: dict[int, str] = {}  # transfer id -> request id

    def teardown(self) -> None:
        self.sender.close()

    def submit(self, task: PrefillTask) -> None:
        """Queue a prompt; its first token comes back through `poll`, its KV goes to `task.target`."""
        self.call(lambda: self._submit(task))

    def _submit(self, task: PrefillTask) -> None:
        first_only = dataclasses.replace(task.params, max_tokens=1)
        self.engine.add_request(task.prompt_token_ids, first_only, task.request_id, hold_blocks=True)
        self.targets[task.request_id] = task.target
        self.real_params[task.request_id] = task.params

    def on_abort(self, request_id: str) -> None:
        super().on_abort(request_id)
        self.real_params.pop(request_id, None)
        if self.targets.pop(request_id, None) is not None:  # its transfer never started: free its blocks now
            self.engine.release(request_id)
        # else: its transfer is reading the blocks; they are freed when it ends (bounded by its deadline)

    # --- the engine's KV saver -------------------------------------------------------------------
    def begin(self, requests: list[Request]) -> Callable[[int], None]:
        tids = []
        for req in requests:
            target = self.targets.pop(req.request_id)
            self.sender.start_send(target.transfer_id, target.destination, list(req.block_table))
            self.sending[target.transfer_id] = req.request_id
            tids.append(target.transfer_id)

        def layer_written(layer: int) -> None:
            for tid in tids:
                # one that already failed (its result says why) must not stop the step
                with contextlib.suppress(TransferError):
                    self.sender.save_kv_layer(tid, layer)
        return layer_written

    # --- the loop's hooks ------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.sending)

    def before_step(self) -> None:
        for result in self.sender.get_finished():
            request_id = self.sending.pop(result.transfer_id, None)
            if request_id is None:
                continue
            self.engine.release(request_id)
            ok = result.state is TransferState.DONE
            self.transferred(request_id, ok, result.num_bytes, result.duration_s)
            if not ok:
                self.fail(request_id, ErrorCode.UNAVAILABLE.grpc_name, f"KV transfer failed: {result.error}")

    def emit(self, outputs) -> None:
        """The first token, finished only if the request itself ends with it (not by the one-token limit
        the prefill engine runs it under)."""
        for o in outputs:
            params = self.real_params.pop(o.request_id, None)
            if o.finish_reason == "length" and params is not None and params.max_tokens > 1:
                o.finish_reason = None if self._fits_another(o) else "length"
        super().emit(outputs)

    def _fits_another(self, output) -> bool:
        held = self.engine.held.get(output.request_id)
        return held is None or held.num_known_tokens < self.engine.max_model_len
