"""The deployment's `kv_transfer:` section: TransferConfig's fields (and the transport), validated at load."""
import dataclasses

import pytest

from pdserve.config import KVTransferConfig, load_config, parse_config
from pdserve.errors import ConfigError
from pdserve.kv_transfer import TransferConfig


def test_section_fields_are_transfer_config_fields_and_the_transport():
    names = {f.name for f in dataclasses.fields(TransferConfig)}
    assert set(KVTransferConfig.model_fields) == names | {"transport"}


def test_defaults_are_transfer_config_defaults():
    section = load_config(None).kv_transfer
    assert section.transport == "auto"
    assert section.transfer_config() == TransferConfig()


def test_yaml_values_reach_the_transfer_config(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("kv_transfer:\n  transport: grpc\n  timeout_s: 5\n  staging_bytes: 1048576\n"
                    "  cuda_graphs: true\n  trace: host\n")
    section = load_config(path).kv_transfer
    assert section.transport == "grpc"
    assert section.transfer_config() == TransferConfig(timeout_s=5.0, staging_bytes=1 << 20, cuda_graphs=True,
                                                       trace="host")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"kv_transfer": {"staging_buffers": 0}},
         "kv_transfer.staging_buffers: Input should be greater than or equal to 1"),
        ({"kv_transfer": {"copy_sm_fraction": 1.5}},
         "kv_transfer.copy_sm_fraction: Input should be less than or equal to 1"),
        ({"kv_transfer": {"transport": "rdma"}},
         "kv_transfer.transport: Input should be 'auto', 'ipc', 'nccl', 'gloo' or 'grpc'"),
        ({"kv_transfer": {"transprt": "grpc"}}, "kv_transfer.transprt: unknown field"),
        ({"transport": "grpc"}, "transport: unknown field"),  # it lives in the section now
    ],
)
def test_bad_section_values_name_the_field(data, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "d.yaml")
    assert err.value.message == f"d.yaml: {expected}"


def test_workers_take_the_section_with_host_sized_staging_on_cpu():
    from pdserve.cluster.transfer import CPU_STAGING_BYTES, make_transfer_config, transport_kinds
    from pdserve.kv_transfer import TransportKind

    config = load_config(None, device="cpu", kv_transfer={"timeout_s": 7.0})
    assert make_transfer_config(config) == TransferConfig(timeout_s=7.0, staging_bytes=CPU_STAGING_BYTES,
                                                          taper_bytes=0)
    assert transport_kinds(config) == (TransportKind.TORCH,)
    config = load_config(None, device="cpu", kv_transfer={"transport": "grpc", "staging_bytes": 1 << 20})
    assert make_transfer_config(config) == TransferConfig(staging_bytes=1 << 20, taper_bytes=0)
    assert transport_kinds(config) == (TransportKind.GRPC,)
    for transport, kinds in [("auto", (TransportKind.IPC, TransportKind.TORCH)), ("ipc", (TransportKind.IPC,)),
                             ("nccl", (TransportKind.TORCH,))]:
        config = load_config(None, device="cuda", kv_transfer={"transport": transport})
        assert transport_kinds(config) == kinds  # auto: each sender takes the first it reaches
