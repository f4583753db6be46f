"""A TP gang's wait for its resources is bounded and says what is missing (a local Ray cluster of 2 CPUs)."""
from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from pdserve.cluster.tp_gang import TPGang
from pdserve.config import load_config
from pdserve.errors import ResourceExhaustedError


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def config(model: str, **overrides):
    return load_config(None, model=model, device="cpu", dtype="float32", **overrides)


def assert_no_group_left() -> None:
    states = [pg["state"] for pg in placement_group_table().values()]
    assert all(state == "REMOVED" for state in states), states


def test_gang_no_node_can_hold_fails_at_once(tiny_checkpoints):
    start = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match=r"^tp 3 needs 3 CPUs, the cluster has 2$"):
        TPGang(config(tiny_checkpoints["llama-mha-tied"]), 3)
    assert time.monotonic() - start < 5
    assert_no_group_left()


def test_gang_waits_for_taken_resources_only_rank_timeout_s(tiny_checkpoints):
    held = placement_group([{"CPU": 1}])
    assert held.wait(timeout_seconds=30)
    try:
        start = time.monotonic()
        with pytest.raises(ResourceExhaustedError, match=r"^tp 2 needs 2 CPUs on one node; they did not come free "
                                                         r"within 1s \(free in the cluster now: 1\)$"):
            TPGang(config(tiny_checkpoints["llama-gqa-untied"], rank_timeout_s=1.0), 2)
        assert time.monotonic() - start < 5
    finally:
        remove_placement_group(held)
    assert_no_group_left()
