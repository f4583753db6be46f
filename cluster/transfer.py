"""A worker rank's KV transfer end (sender or receiver) over its slice of the cache, from the deployment's
`kv_transfer:` section."""
from __future__ import annotations

import dataclasses

import ray
import torch

from pdserve.config import DeploymentConfig
from pdserve.engine.model_runner import wants_cuda
from pdserve.kv_transfer import KVLayout, KVReceiver, KVSender, TransferConfig, TransportKind

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
    if transport == "ipc":
        return (TransportKind.IPC,)
    if transport == "auto" and wants_cuda(config):
        return (TransportKind.IPC, TransportKind.TORCH)
    return (TransportKind.TORCH,)


def _layout(kv_cache: torch.Tensor, config: DeploymentConfig, num_kv_heads: int, size: int, rank: int):
    return KVLayout.of_cache(kv_cache, config.model, num_kv_heads, size, rank)


def make_sender(kv_cache: torch.Tensor, config: DeploymentConfig, num_kv_heads: int, size: int,
                rank: int) -> KVSender:
    """Source blocks are freed by the worker's loop when every rank's part has ended, not by the sender."""
    return KVSender(_layout(kv_cache, config, num_kv_heads, size, rank), kv_cache, lambda ids: None,
                    config=make_transfer_config(config))


def make_receiver(kv_cache: torch.Tensor, config: DeploymentConfig, num_kv_heads: int, size: int, rank: int,
                  release) -> KVReceiver:
    return KVReceiver(_layout(kv_cache, config, num_kv_heads, size, rank), kv_cache, release,
                      transport_kinds(config), host=ray.util.get_node_ip_address(),
                      config=make_transfer_config(config))
