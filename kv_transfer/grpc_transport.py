"""gRPC transport: the same staged bytes, streamed in chunks to a KV-ingest service on each receiving rank.

For CPU deployments and nodes without a shared NCCL fabric. Each message is one Push stream whose first
chunk carries the header, so messages are self-contained: a receiver keeps no per-pair stream state, and
"tearing a pair down" is the sender closing its channel (it reconnects on next use).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import torch

from pdserve.api import kv_transfer_pb2 as pb
from pdserve.api import kv_transfer_pb2_grpc as pb_grpc
from pdserve.errors import TransferError
from pdserve.kv_transfer.layout import KVLayout, check_match
from pdserve.kv_transfer.messages import Endpoint, MessagePart, TransferConfig, TransferHeader, TransportKind
from pdserve.kv_transfer.staging import StagingPool
from pdserve.kv_transfer.transport import Ingest, Link

_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def layout_to_msg(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(**layout.to_dict())


def layout_from_msg(msg: pb.KVLayout) -> KVLayout:
    return KVLayout.from_dict({name: getattr(msg, name) for name in KVLayout.__dataclass_fields__})


class GrpcIngest(pb_grpc.KVIngestServicer, Ingest):
    """The KV-ingest service of one receiving rank."""

    def __init__(self, receiver, host: str):
        self.receiver = receiver
        config, device = receiver.config, receiver.kv_cache.device
        # A CUDA cache needs host buffers to assemble chunks in before the copy up; a CPU cache uses its own.
        self._host = (StagingPool(config.staging_buffers, config.staging_bytes, torch.device("cpu"))
                      if device.type == "cuda" else None)
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._server = grpc.server(ThreadPoolExecutor(max_workers=8), options=_UNLIMITED)
        pb_grpc.add_KVIngestServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        self._server.start()
        self.endpoint = Endpoint(TransportKind.GRPC, host, port)

    def Connect(self, request: pb.ConnectRequest, context) -> pb.ConnectReply:
        local = self.receiver.layout
        error = ""
        try:
            check_match(local, layout_from_msg(request.layout), "receiver", "sender")
        except TransferError as e:
            self.receiver.reject(request.transfer_id, e.message)
            error = e.message
        return pb.ConnectReply(layout=layout_to_msg(local), conn_id=self.receiver.new_conn_id(), error=error)

    def Push(self, request_iterator, context) -> pb.PushReply:
        first = next(request_iterator)
        h = first.header
        header = TransferHeader(h.transfer_id, h.num_blocks, (h.head_start, h.head_end),
                                h.layers_per_message, h.blocks_per_message)
        part = MessagePart((h.layer_start, h.layer_end), (h.block_start, h.block_end))
        try:
            inc = self.receiver.open_part(h.conn_id, header)
            delivered = self._ingest(inc, header, part, itertools.chain([first], request_iterator))
        except TransferError as e:
            self.receiver.conn_lost(h.conn_id, e.message)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, e.message)
        if not delivered:
            context.abort(grpc.StatusCode.ABORTED, f"transfer {h.transfer_id} already ended")
        return pb.PushReply()

    def _ingest(self, inc, header: TransferHeader, part: MessagePart, chunks) -> bool:
        receiver = self.receiver
        pool = self._host or receiver.staging
        buf = pool.acquire(inc.deadline)
        try:
            payload = buf.view(receiver.layout.torch_dtype, receiver.part_shape(header, part))
            flat = buf.data[:payload.nbytes].numpy()
            offset = 0
            for chunk in chunks:
                n = len(chunk.data)
                if offset + n > flat.size:
                    raise TransferError(f"message of transfer {header.transfer_id} is longer than its header")
                flat[offset:offset + n] = np.frombuffer(chunk.data, dtype=np.uint8)
                offset += n
            if offset != flat.size:  # the stream ended early: the sender went away mid-message
                raise TransferError(f"message of transfer {header.transfer_id} ended after {offset} of "
                                    f"{flat.size} bytes")
            if self._host is None:
                delivered = receiver.scatter(inc, header, part, payload)
            else:
                delivered = self._scatter_on_device(inc, header, part, payload)
        finally:
            pool.release(buf)
        if delivered:
            receiver.landed(inc, header, [part])
        return delivered

    def _scatter_on_device(self, inc, header, part, host_payload: torch.Tensor) -> bool:
        with torch.cuda.stream(self._side):
            dev = self.receiver.staging.acquire(inc.deadline)
            try:
                payload = dev.view(host_payload.dtype, tuple(host_payload.shape))
                payload.copy_(host_payload)
                delivered = self.receiver.scatter(inc, header, part, payload)
                self._side.synchronize()  # the host buffer is reused and the message counted right after
                return delivered
            finally:
                self.receiver.staging.release(dev)

    def drop_conn(self, conn_id: int) -> None:
        """Nothing to tear down here: every Push stands alone (see the module docstring)."""

    def close(self) -> None:
        self._server.stop(grace=None)


class GrpcLink(Link):
    """Sending rank's end of one pair: a channel to the receiver's KV-ingest service."""

    def __init__(self, host: str, port: int, device: torch.device, config: TransferConfig):
        self.device, self.config = device, config
        self._channel = grpc.insecure_channel(f"{host}:{port}", options=_UNLIMITED)
        self._stub = pb_grpc.KVIngestStub(self._channel)
        self._conn_id: int | None = None
        # CUDA: one reused pinned buffer per pair to bring staged bytes to the host.
        self._host = (torch.empty(config.staging_bytes, dtype=torch.uint8, pin_memory=True)
                      if device.type == "cuda" else None)

    def connect(self, local: KVLayout, transfer_id: int, deadline: float) -> KVLayout:
        request = pb.ConnectRequest(layout=layout_to_msg(local), transfer_id=transfer_id)
        try:
            reply = self._stub.Connect(request, timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as e:
            raise TransferError(f"KV ingest at {self._channel} did not answer: {e.code().name}") from e
        remote = layout_from_msg(reply.layout)
        check_match(local, remote, "sender", "receiver")
        self._conn_id = reply.conn_id
        return remote

    def is_open(self) -> bool:
        return self._conn_id is not None

    def begin(self, header: TransferHeader, deadline: float, on_device: torch.Tensor | None) -> None:
        """Nothing: every message carries its own header."""

    def send(self, header: TransferHeader, part: MessagePart, payload: torch.Tensor, deadline: float) -> None:
        # payload: [nbytes] uint8, a view of a staging buffer
        if self._host is not None:
            host = self._host[:payload.numel()]
            host.copy_(payload)
            payload = host
        data = memoryview(payload.numpy())
        msg_header = pb.MessageHeader(
            conn_id=self._conn_id, transfer_id=header.transfer_id, num_blocks=header.num_blocks,
            head_start=header.heads[0], head_end=header.heads[1],
            layers_per_message=header.layers_per_message, blocks_per_message=header.blocks_per_message,
            layer_start=part.layers[0], layer_end=part.layers[1], block_start=part.blocks[0],
            block_end=part.blocks[1])
        step = self.config.grpc_chunk_bytes

        def chunks():
            for offset in range(0, max(len(data), 1), step):
                chunk = pb.KVChunk(data=bytes(data[offset:offset + step]))
                if offset == 0:
                    chunk.header.CopyFrom(msg_header)
                yield chunk

        try:
            self._stub.Push(chunks(), timeout=max(deadline - time.monotonic(), 0.001))
        except grpc.RpcError as e:
            raise TransferError(f"KV push failed: {e.code().name}: {e.details()}") from e

    def flush(self, deadline: float, after=None) -> None:
        """Nothing: each Push returns only after the receiver scattered the message."""

    def close(self, graceful: bool) -> None:
        with contextlib.suppress(Exception):
            self._channel.close()
