"""The shipped deployment files and the `ray up` file validate against their schemas."""
from pathlib import Path

import pytest
import yaml

from pdserve.config import load_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("name", ["default", "cpu-1p1d", "colocated", "1p1d", "2p2d-tp2"])
def test_serving_configs_validate(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.model


def test_ray_cluster_file_follows_rays_schema():
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)  # raises on anything Ray's own schema rejects
    assert "pdserve serve" in " ".join(config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "head_node_typo": "head"}, schema)
