"""KV transfer between prefill and decode ranks: layout handshake, torch.distributed and gRPC transports,
resharding between TP sizes. See docs/kv_transfer.md."""
from pdserve.kv_transfer.layout import KVLayout, SendSlice, check_match, heads_of_rank, plan_sends
from pdserve.kv_transfer.messages import (
    Destination,
    Endpoint,
    TransferConfig,
    TransferResult,
    TransferState,
    TransferStats,
    TransportKind,
)
from pdserve.kv_transfer.receiver import KVReceiver
from pdserve.kv_transfer.sender import KVSender

__all__ = [
    "Destination", "Endpoint", "KVLayout", "KVReceiver", "KVSender", "SendSlice", "TransferConfig",
    "TransferResult", "TransferState", "TransferStats", "TransportKind", "check_match", "heads_of_rank",
    "plan_sends",
]
