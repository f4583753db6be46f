"""KV transfer settings of a deployment, as the transfer ends take them."""
from __future__ import annotations

import dataclasses

from pdserve.config import DeploymentConfig
from pdserve.engine.model_runner import wants_cuda
from pdserve.kv_transfer import TransferConfig, TransportKind

CPU_STAGING_BYTES = 64 << 20  # host memory: the GPU default (512 MiB per buffer) would be wasted there


def make_transfer_config(config: DeploymentConfig) -> TransferConfig:
    """The deployment's `kv_transfer:` section; on CPU, staging sized for host memory and no taper unless the
    section sets them."""
    section = config.kv_transfer
    if wants_cuda(config):
        return section.transfer_config()
    cpu = {"staging_bytes": CPU_STAGING_BYTES, "taper_bytes": 0}
    return dataclasses.replace(section.transfer_config(),
                               **{k: v for k, v in cpu.items() if k not in section.model_fields_set})


def transport_kinds(config: DeploymentConfig) -> tuple[TransportKind, ...]:
    """What a receiving rank listens on, in order of preference; each sender takes the first it reaches
    (kv_transfer.place.choose, at the handshake). `auto` on CUDA: IPC, then NCCL; on CPU: gloo."""
    transport = config.kv_transfer.transport
    if transport == "grpc":
        return (TransportKind.GRPC,)
    if transport == "ipc" or (transport == "auto" and wants_cuda(config)):
        return (TransportKind.IPC, TransportKind.TORCH) if transport == "auto" else (TransportKind.IPC,)
    return (TransportKind.TORCH,)
