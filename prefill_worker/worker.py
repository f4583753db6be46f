"""The prefill worker: computes prompts (batched under the token budget, long ones chunked), reports each
first token at once, and ships each prompt's KV to the decode blocks the router reserved for it.

A prompt's blocks outlive its request until its transfer ends, done or failed (a delayed free). The
transfer starts with the step that completes the prompt, and each layer is marked written as the model
finishes it, so the KV moves while later layers still compute. Under TP every rank ships its own kv heads
(rank 0 tells the others through the step channel); the blocks are freed once every rank's part has ended.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ray

from pdserve.cluster.engine_worker import EngineWorker
from pdserve.cluster.kv_rank import KV_SEND, layer_saver, send_message
from pdserve.cluster.transfer import make_sender
from pdserve.engine.request import Request
from pdserve.errors import ErrorCode
from pdserve.kv_transfer import Destination, TransferState
from pdserve.messages import KVTarget, PrefillTask


@dataclasses.dataclass
class _Send:
    request_id: str
    ranks_left: int
    ok: bool = True
    error: str | None = None
    num_bytes: int = 0
    seconds: float = 0.0


class PrefillWorker(EngineWorker):
    role = "prefill"

    def __init__(self, config: dict, name: str, tp_size: int = 1, destinations: list[Destination] = ()):
        super().__init__(config, name, tp_size)
        self.destinations = list(destinations)  # every decode gang this worker may ship to (index: KV_SEND)

    def add_destination(self, destination: Destination) -> None:
        """A new decode gang (a replacement) this worker may ship to; every rank learns it."""
        self.call(lambda: self.destinations.append(destination))
        if self.peers is not None:
            ray.get([p.add_destination.remote(destination) for p in self.peers.peers],
                    timeout=self.config.rank_timeout_s)

    def setup(self) -> None:
        runner = self.engine.runner
        self.sender = make_sender(runner.kv_cache, self.config, self.engine.spec.num_kv_heads, self.tp_size, 0)
        self.engine.kv_saver = self
        self.targets: dict[str, KVTarget] = {}  # queued or prefilling
        self.real_params: dict[str, object] = {}
        self.sending: dict[int, _Send] = {}  # transfer id -> its request and the ranks still sending

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
            blocks = list(req.block_table)
            self.sender.start_send(target.transfer_id, target.destination, blocks)
            if self.tp_size > 1:
                index = self.destinations.index(target.destination)
                self.publish(KV_SEND, send_message(target.transfer_id, index, blocks))
            self.sending[target.transfer_id] = _Send(req.request_id, self.tp_size)
            tids.append(target.transfer_id)
        return layer_saver(self.sender, tids)

    # --- the loop's hooks ------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self.sending)

    def before_step(self) -> None:
        ended = [(r.transfer_id, r.state is TransferState.DONE, r.error, r.num_bytes, r.duration_s)
                 for r in self.sender.get_finished()]
        ended += [(tid, ok, error, 0, 0.0) for tid, ok, error in self.peer_results()]
        for tid, ok, error, num_bytes, seconds in ended:
            send = self.sending.get(tid)
            if send is None:
                continue
            send.ranks_left -= 1
            send.ok, send.error = send.ok and ok, send.error or error
            send.num_bytes, send.seconds = send.num_bytes + num_bytes, max(send.seconds, seconds)
            if send.ranks_left == 0:
                self._ended(tid, send)

    def _ended(self, tid: int, send: _Send) -> None:
        del self.sending[tid]
        self.engine.release(send.request_id)
        self.transferred(send.request_id, send.ok, send.num_bytes, send.seconds)
        if not send.ok:
            self.fail(send.request_id, ErrorCode.UNAVAILABLE.grpc_name, f"KV transfer failed: {send.error}",
                      retry=True)

    def emit(self, outputs) -> None:
        """The first token, finished only if the request itself ends with it (not by the one-token limit
        the prefill engine runs it under)."""
        for o in outputs:
            params = self.real_params.pop(o.request_id, None)
            if o.finish_reason == "length" and params is not None and params.max_tokens > 1:
                held = self.engine.held.get(o.request_id)
                fits = held is None or held.num_known_tokens < self.engine.max_model_len
                o.finish_reason = None if fits else "length"
        super().emit(outputs)
