"""One GPU, the whole serving path: prefill and decode workers share the card (half a Ray GPU each), KV moves
by `transport: auto` (IPC, since both ends are on this GPU), and the greedy text of 16 prompts equals the
colocated deployment's on the same GPU. The tiny model keeps it fast."""
from __future__ import annotations

import sys

import pytest
import ray
import torch
from serving_support import GREEDY, collect, pools_full, tiny_config

from pdserve.cluster.serve import ServerThread
from pdserve.kv_transfer import TransportKind
from pdserve.kv_transfer.place import choose

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

PROMPTS = [f"Prompt {i}: " + "the quick brown fox jumps over the lazy dog " * (i % 5) + str(i * 7919)
           for i in range(16)]
MAX_TOKENS = 16


def _serve(path, **overrides) -> tuple[list[list[int]], list]:
    """(greedy ids of PROMPTS, workers whose block pool is not full once they ended)."""
    config = tiny_config(path, device="cuda", num_kv_blocks=256, **overrides)
    with ServerThread(config) as server:
        if config.disaggregated:
            [decode] = [w for w in server.router.workers if w.role == "decode"]
            [endpoint] = ray.get(decode.actor.destination.remote(), timeout=30).endpoints
            # what the prefill worker's sender takes: it runs on this node and this GPU, as this process does
            want = TransportKind.IPC if config.kv_transfer.transport == "auto" else TransportKind.GRPC
            assert choose(endpoint, torch.device("cuda", 0)).kind is want
        got = [collect(server.grpc_address, text=t, sampling={**GREEDY, "max_tokens": MAX_TOKENS})[0]
               for t in PROMPTS]
        short = pools_full(server)
        if short and config.disaggregated:  # what the prefill worker's sender says, to tell where blocks stay
            [prefill] = [w for w in server.router.workers if w.role == "prefill"]
            ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
            short.append(ray.get(prefill.actor.__ray_call__.remote(_sender_state), timeout=30))
        return got, short


def _sender_state(worker) -> dict:
    sender = worker.sender
    active = [(tid, out.state.name, out.parts_left, out.layers_ready) for tid, out in sender._book.active.items()]
    return {"stats": sender.stats.snapshot(), "sending": len(worker.sending), "active": active[:4],
            "finished": [(r.transfer_id, r.state.name, r.error) for r in list(sender._book.finished.values())[:4]]}


@pytest.fixture(scope="module")
def colocated(path):
    got, short = _serve(path, disaggregated=False)
    assert short == [] and all(len(ids) == MAX_TOKENS for ids in got)
    return got


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_one_gpu_disaggregated_serves_the_colocated_text(path, colocated, transport):
    half = {"count": 1, "tp_size": 1, "num_gpus": 0.5}
    got, short = _serve(path, prefill=half, decode=half, kv_transfer={"transport": transport, "timeout_s": 20.0})
    assert got == colocated
    assert short == []
