"""Receiving rank of the torch.distributed transport: one thread (and CUDA side stream) per connected pair."""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdserve.errors import TransferError, TransferGone
from pdserve.kernels import ops
from pdserve.kv_transfer.cuda_wait import sync_event
from pdserve.kv_transfer.graphs import GraphCache, capture
from pdserve.kv_transfer.layout import KVLayout, check_match
from pdserve.kv_transfer.messages import (
    HEADER_LEN,
    Endpoint,
    TransferHeader,
    TransferState,
    TransportKind,
    message_plan,
)
from pdserve.kv_transfer.pair_store import StoreListener, _td, closed_key
from pdserve.kv_transfer.torch_dist import (
    RECEIVER,
    SENDER,
    abort_in_background,
    group_timeout_s,
    make_group,
    recv_header,
    wait_work,
)
from pdserve.kv_transfer.trace import NO_TRACE
from pdserve.kv_transfer.transport import Ingest

# An NCCL pair with no expected transfer re-checks this often whether it was dropped or went idle too long.
_IDLE_CHECK_S = 0.2


@dataclass
class _Pair:
    conn_id: int
    dropped: threading.Event = field(default_factory=threading.Event)
    group: dist.ProcessGroup | None = None
    header_bufs: tuple[torch.Tensor, torch.Tensor] | None = None  # NCCL: where headers land (device, host)
    pending: object = NO_TRACE  # the next header's marks, until its transfer is known (kv_transfer.trace)
    # NCCL, TransferConfig.cuda_graphs: this pair's graphs of whole transfers, and the device buffer of block
    # ids they read (see _receive_graph)
    graphs: GraphCache = field(default_factory=GraphCache)
    ids_dev: torch.Tensor | None = None


class TorchDistIngest(Ingest):
    """Accepts pairs through the store it hosts and drains each pair's messages into the receiver's blocks."""

    def __init__(self, receiver, host: str):
        self.receiver, self.host = receiver, host
        self.device = receiver.kv_cache.device
        self._pairs: dict[int, _Pair] = {}
        self._lock = threading.Lock()
        on_tick = self._reap if self.device.type == "cuda" else None
        self._listener = StoreListener(host, self._on_hello, receiver.config, on_tick)
        self.endpoint = Endpoint(TransportKind.TORCH, host, self._listener.port)

    def _on_hello(self, conn_id: int, remote: KVLayout, transfer_id: int) -> None:
        # Reply with our layout even on a mismatch, so the sender names the field from its side too.
        self._listener.reply(conn_id, self.receiver.layout)
        try:
            check_match(self.receiver.layout, remote, "receiver", "sender")
        except TransferError as e:
            self.receiver.reject(transfer_id, e.message)
            return
        pair = _Pair(conn_id)
        with self._lock:
            self._pairs[conn_id] = pair
        threading.Thread(target=self._serve, args=(pair,), name=f"kv-recv-{conn_id}", daemon=True).start()

    def _serve(self, pair: _Pair) -> None:
        config, stats = self.receiver.config, self.receiver.stats
        cuda = self.device.type == "cuda"
        if cuda:  # a new thread starts on GPU 0 whatever the main thread chose
            torch.cuda.set_device(self.device)
        # Receives are posted on `side`, scattered on `scatter` (see _receive).
        side = torch.cuda.Stream(self.device) if cuda else None
        scatter = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            try:
                # This thread's own client of the store: its blocking calls (NCCL's rendezvous) never hold
                # up the listener or other pairs, which share the hosting client.
                store = dist.TCPStore(self.host, self._listener.port, is_master=False, wait_for_workers=False,
                                      timeout=_td(config.connect_timeout_s))
                pair.group = make_group(store, pair.conn_id, RECEIVER, self.device, self.host,
                                        group_timeout_s(config), time.monotonic() + config.connect_timeout_s)
                stats.add(groups_created=1)
                next_header = self._nccl_header if cuda else self._gloo_header
                while not pair.dropped.is_set():
                    # A live sender closes an idle pair itself, so a silence twice as long means it is gone.
                    values = next_header(pair, time.monotonic() + 2 * config.idle_timeout_s)
                    if values is None:  # dropped while waiting
                        break
                    header = TransferHeader.from_list(values)
                    if header is None:
                        break
                    if cuda and self.receiver.config.cuda_graphs:
                        self._receive_graph(pair, header, scatter)
                    else:
                        self._receive(pair, header, scatter)
            except Exception as e:  # noqa: BLE001 - whatever broke the pair fails what it was carrying
                if not pair.dropped.is_set():
                    self.receiver.conn_lost(pair.conn_id, str(e))
            finally:
                self._teardown(pair)

    def _gloo_header(self, pair: _Pair, idle_deadline: float) -> list[int]:
        values = recv_header(pair.group, self.device, idle_deadline)
        pair.pending = self.receiver.pending_trace()
        pair.pending.mark("header received (host)")
        return values

    def _nccl_header(self, pair: _Pair, idle_deadline: float) -> list[int] | None:
        """The pair's next header, received as an NCCL message; None once the pair is dropped.

        NOTE: the receive is posted only while some expected transfer has parts no header announced yet
        (expect() wakes this thread), and then at once: it is already waiting on the GPU when the sender
        posts the header, so the header costs the critical path one small NCCL message and a host wake-up,
        and no store round trip. An idle pair leaves no NCCL kernel on the GPU (a posted receive is a
        kernel spinning until its message: a device-wide synchronize, or the first launch of a kernel
        not loaded yet, would wait for the next transfer). With several sending ranks connected, every
        pair posts one when a transfer is expected and one pair brings it; the others' receives stay
        posted until their next transfer, or until their sender closes the pair (_reap drops it).
        """
        while not self.receiver.await_unclaimed(_IDLE_CHECK_S, pair.dropped):
            if pair.dropped.is_set():
                return None
            if time.monotonic() > idle_deadline:
                raise TransferError("no transfer from the sender within twice the idle timeout")
        if pair.header_bufs is None:  # [HEADER_LEN] int64 on the GPU, and pinned on the host
            pair.header_bufs = (torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device),
                                torch.empty(HEADER_LEN, dtype=torch.int64, pin_memory=True))
        dev, host = pair.header_bufs
        pair.pending = tr = self.receiver.pending_trace()
        tr.mark("pair thread woken by expect")
        work = pair.group.recv([dev], SENDER, 0)
        work.wait()  # this stream waits for the receive
        tr.mark("header recv posted | landed", gpu=True)
        host.copy_(dev, non_blocking=True)
        # The sender may start much later: sleep in the driver rather than spin, unless configured otherwise.
        arrived = torch.cuda.Event(blocking=not self.receiver.config.spin_for_header)
        arrived.record()
        sync_event(arrived, idle_deadline, lambda: self.drop_conn(pair.conn_id), "transfer header")
        tr.mark("header seen by host (event wait returned)")
        if pair.dropped.is_set():
            return None
        return host.tolist()

    def _receive(self, pair: _Pair, header: TransferHeader, scatter: torch.cuda.Stream | None) -> None:
        """Post the receives as soon as the header is known; each scatter follows its receive on another stream.

        NOTE (CUDA): the sender's sends wait for these receives, so the first ones are posted before anything
        else (even before the header is checked against the expectation: a bad header tears the pair down
        all the same), as many as there are free staging buffers, and each later one as soon as a buffer is
        handed back (stream-ordered, behind the scatter that read it). Only a pair holding no buffer waits
        for one: pairs share the pool, and two waiting while holding buffers would wait for each other.
        NCCL's stream waits for the stream a receive is posted from: receives are posted from this thread's
        stream, which carries nothing but those waits for staging buffers, and scatters run on `scatter`, so
        the receive of message k+1 runs while message k is scattered. No host sync until the last scatter
        is enqueued.
        """
        receiver, cuda = self.receiver, self.device.type == "cuda"
        dtype = receiver.layout.torch_dtype
        parts = message_plan(receiver.layout.num_layers, header)
        deadline = time.monotonic() + receiver.config.timeout_s  # until the expectation's own is known
        posted: collections.deque = collections.deque()  # (k, buf, payload, work), k ascending
        tr = pair.pending
        pair.pending = NO_TRACE

        def post_more() -> None:
            """Post the next receives: while a buffer is free, or (holding none) once one is."""
            while (k := posted[-1][0] + 1 if posted else next_k) < len(parts) and \
                    len(posted) < receiver.config.receives_ahead:
                # this stream waits until the buffer's last scatter ran
                buf = receiver.staging.acquire(None if posted else deadline)
                if buf is None:
                    return
                try:
                    payload = buf.view(dtype, receiver.part_shape(header, parts[k]))  # [Lm, 2, nm, Hm, Bs, D]
                    posted.append((k, buf, payload, pair.group.recv([buf.data[:payload.nbytes]], SENDER, 0)))
                except BaseException:
                    receiver.staging.release(buf)
                    raise
                tr.mark("recv posted | may start", k, gpu=True)  # device: this stream let NCCL's go

        on_scatter = (lambda: torch.cuda.stream(scatter)) if cuda else contextlib.nullcontext
        next_k = 0  # the next message to post once `posted` is empty
        try:
            post_more()
            try:
                inc = receiver.open_part(pair.conn_id, header)
            except TransferGone:
                # Its messages are on the pair all the same, ahead of other transfers': they are read and
                # dropped (bounded), so the pair, and what it carries next, stays up.
                inc = None
                deadline = time.monotonic() + receiver.config.timeout_s
            if inc is not None:
                inc.trace.absorb(tr)
                tr = inc.trace
                tr.mark("transfer known (open_part)")
                deadline = inc.deadline
            delivered = inc is not None
            while posted:
                k, buf, payload, work = posted.popleft()
                next_k = k + 1
                try:
                    with on_scatter():
                        wait_work(work, deadline, cuda)  # CUDA: `scatter` waits for the receive
                        tr.mark("recv awaited | done", k, gpu=True)  # gloo: the host waited for it
                        if delivered and not receiver.scatter(inc, header, parts[k], payload):
                            # it ended here meanwhile (its deadline): the rest is drained like the above
                            delivered, deadline = False, time.monotonic() + receiver.config.timeout_s
                        tr.mark("scatter launched | done", k, gpu=True)
                finally:
                    with on_scatter():
                        receiver.staging.release(buf)  # CUDA: free once the scatter (on `scatter`) ran
                if pair.dropped.is_set():
                    raise TransferError(f"transfer {header.transfer_id} ended while its messages were arriving")
                post_more()
        except BaseException:
            for _, buf, _, _ in posted:  # their receives end with the pair (torn down by the caller)
                receiver.staging.release(buf)
            raise
        if cuda:  # the scatters were enqueued on `scatter`: the host blocks until they ran (no sleep between
            done = torch.cuda.Event()  # polls; past the deadline the pair is dropped, which ends its receives)
            done.record(scatter)
            sync_event(done, deadline, lambda: self.drop_conn(pair.conn_id), "KV scatter")
            tr.mark("last scatter seen by host (event wait returned)")
        if delivered:
            receiver.landed(inc, header, parts)
        else:
            receiver.stats.add(transfers_drained=1)

    def _receive_graph(self, pair: _Pair, header: TransferHeader, scatter: torch.cuda.Stream) -> None:
        """The whole transfer (every receive, every scatter on `scatter`) from one CUDA graph of its plan
        (graphs.py), captured on first use; it reads the block ids from the pair's device buffer (refilled
        just before, on this stream) and holds every staging buffer while it runs."""
        receiver = self.receiver
        layout = receiver.layout
        inc = receiver.open_part(pair.conn_id, header)
        inc.trace.absorb(pair.pending)
        pair.pending = NO_TRACE
        tr = inc.trace
        tr.mark("transfer known (open_part)")
        parts = message_plan(layout.num_layers, header)
        shapes = [receiver.part_shape(header, part) for part in parts]
        heads = (header.heads[0] - layout.heads[0], header.heads[1] - layout.heads[0])  # this rank's local ones
        n = header.num_blocks
        if pair.ids_dev is None or pair.ids_dev.numel() < n:
            pair.ids_dev = torch.empty(max(n, receiver.kv_cache.shape[2]), dtype=torch.int64, device=self.device)
        ids = pair.ids_dev
        bufs = receiver.staging.acquire_all(inc.deadline)  # this stream waits until their last uses ran

        def enqueue() -> None:
            here = torch.cuda.current_stream()
            scattered = []
            for k, part in enumerate(parts):
                buf = bufs[k % len(bufs)]
                if k >= len(bufs):
                    here.wait_event(scattered[k - len(bufs)])  # the buffer's previous scatter ran
                payload = buf.view(layout.torch_dtype, shapes[k])  # [Lm, 2, nm, Hm, Bs, D]
                work = pair.group.recv([buf.data[:payload.nbytes]], SENDER, 0)
                with torch.cuda.stream(scatter):
                    work.wait()
                    ops.scatter_blocks(payload, receiver.kv_cache, ids[part.blocks[0]:part.blocks[1]], part.layers,
                                       heads, receiver.copy_programs)
                    scattered.append(torch.cuda.Event())
                    scattered[-1].record()
            here.wait_stream(scatter)

        key = (n, header.heads, header.layers_per_message, header.blocks_per_message, header.taper_units,
               receiver.copy_programs, ids.data_ptr())
        done = torch.cuda.Event()
        with inc.lock:
            if inc.state.finished:
                for buf in bufs:
                    receiver.staging.release(buf)
                raise TransferError(f"transfer {header.transfer_id} ended before its messages arrived")
            inc.state = TransferState.TRANSFERRING
            inc.launching += 1  # its blocks stay out of the pool until the replay is accounted for
        try:
            ids[:n].copy_(inc.pinned_ids, non_blocking=True)
            captured = pair.graphs.captured
            graph = pair.graphs.get(key, lambda: capture(torch.cuda.current_stream(), enqueue))
            receiver.stats.add(graph_transfers=1, graphs_captured=pair.graphs.captured - captured)
            tr.mark("graph ready")
            graph.replay()
            tr.mark("graph launched (receives, scatters) | done", gpu=True)
        finally:
            done.record()
            with inc.lock:
                inc.launching -= 1
                inc.scatters[torch.cuda.current_stream().stream_id] = done
                inc.num_bytes += sum(math.prod(shape) for shape in shapes) * layout.torch_dtype.itemsize
            for buf in bufs:
                receiver.staging.release(buf, done)
        # past the deadline the pair is dropped, which ends its receives
        sync_event(done, inc.deadline, lambda: self.drop_conn(pair.conn_id), "KV transfer")
        tr.mark("last scatter seen by host (event wait returned)")
        if pair.dropped.is_set():
            raise TransferError(f"transfer {header.transfer_id} ended while its messages were arriving")
        receiver.landed(inc, header, parts)

    def drop_conn(self, conn_id: int) -> None:
        """Tear a pair down from outside its thread (its transfer failed): the sender rebuilds on next use."""
        with self._lock:
            pair = self._pairs.get(conn_id)
        if pair is None or pair.dropped.is_set():
            return
        pair.dropped.set()
        self.receiver.wake()  # the pair's thread, if it waits for an expected transfer
        with contextlib.suppress(Exception):
            self._listener.store.set(closed_key(conn_id), "1")
        if pair.group is not None and self.device.type == "cuda":
            # NCCL receives (a header's, or those of a dead sender) never finish on their own; aborting ends
            # them and wakes the pair's thread from its wait (gloo ones time out). On a thread of its own:
            # an abort that takes long (or never returns) holds up no caller (the watchdog, the deadline guard).
            abort_in_background(pair.group, f"kv-abort-recv-{conn_id}", wait_s=1.0)

    def _reap(self) -> None:
        """NCCL (on the listener thread, every StoreListener.TICK_S): drop the pairs their senders closed.

        NOTE: a sender closes an NCCL pair by its mark in the store alone (an NCCL close message would wait
        for a receive that is only posted while a transfer is expected), so this is how a pair thread
        waiting for a header learns that none will come.
        """
        with self._lock:
            pairs = [p for p in self._pairs.values() if not p.dropped.is_set()]
        for pair in pairs:
            with contextlib.suppress(Exception):
                if self._listener.store.check([closed_key(pair.conn_id)]):
                    self.drop_conn(pair.conn_id)

    def _teardown(self, pair: _Pair) -> None:
        self.drop_conn(pair.conn_id)
        with self._lock:
            self._pairs.pop(pair.conn_id, None)
        if pair.group is not None:
            self.receiver.stats.add(groups_torn_down=1)
            pair.group = None

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            conn_ids = list(self._pairs)
        for conn_id in conn_ids:
            self.drop_conn(conn_id)

