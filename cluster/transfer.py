"""KV transfer settings of a deployment, as the transfer ends take them."""
from __future__ import annotations

from pdserve.config import DeploymentConfig
from pdserve.engine.model_runner import wants_cuda
from pdserve.kv_transfer import TransferConfig, TransportKind

CPU_STAGING_BYTES = 64 << 20  # host memory: the GPU default (512 MiB per buffer) would be wasted there


def make_transfer_config(config: DeploymentConfig) -> TransferConfig:
    if wants_cuda(config):
        return TransferConfig(timeout_s=config.transfer_timeout_s)
    return TransferConfig(timeout_s=config.transfer_timeout_s, staging_bytes=CPU_STAGING_BYTES,
                          taper_bytes=0)


def transport_kind(config: DeploymentConfig) -> TransportKind:
    """`auto`: torch.distributed (NCCL between GPUs, gloo on CPU); `grpc` where asked."""
    return TransportKind.GRPC if config.transport == "grpc" else TransportKind.TORCH
