"""One sending rank's link to one receiving rank: a FIFO of transfers, one thread, one cached connection."""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import time

import torch

from pdserve.errors import TransferError
from pdserve.kernels import ops
from pdserve.kv_transfer.graphs import capture
from pdserve.kv_transfer.layout import SendSlice, message_shape
from pdserve.kv_transfer.messages import HEADER_LEN, Endpoint, TransferHeader, TransportKind, message_plan
from pdserve.kv_transfer.place import choose
from pdserve.kv_transfer.staging import device_index
from pdserve.kv_transfer.transport import Link, open_link


class PairWorker:
    """Sends transfers to one receiving rank strictly in the order they were started (so they complete in
    order), over a link built on first use, rebuilt after a teardown, and closed after idling."""

    def __init__(self, sender, endpoint: Endpoint, dst_rank: int, dst_tp_size: int):
        self.sender, self.endpoint = sender, endpoint
        self._kind: TransportKind | None = None  # of the endpoint the link was made to (see _ensure_link)
        self.dst_rank, self.dst_tp_size = dst_rank, dst_tp_size
        self._queue: collections.deque = collections.deque()  # (Outgoing, SendSlice)
        self._cond = threading.Condition()
        self._stopping = False
        self._link: Link | None = None
        self._spin_until = 0.0  # monotonic: poll for the current transfer's layers until then
        # CUDA: pinned host buffer of header + block ids, and the event after its last copy (see _stage_ids)
        self._ids_host: torch.Tensor | None = None
        self._ids_copied: torch.cuda.Event | None = None
        self._ids_dev: torch.Tensor | None = None  # CUDA: where they land, kept (see _stage_ids)
        self._header_stream: torch.cuda.Stream | None = None  # CUDA: see _run
        self._thread = threading.Thread(target=self._run, name=f"kv-send-{endpoint.port}", daemon=True)
        self._thread.start()

    def submit(self, out, part: SendSlice) -> None:
        with self._cond:
            self._queue.append((out, part))
            self._cond.notify()

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._queue)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next(self):
        """The next transfer, or None once idle past the timeout (the worker then retires). For
        `sender_spin_s` after the last one it polls the queue rather than sleeping (see TransferConfig)."""
        now = time.monotonic()
        idle_until = now + self.sender.config.idle_timeout_s
        spin_until = now + self.sender.config.sender_spin_s
        while not self._queue and not self._stopping and time.monotonic() < spin_until:
            time.sleep(0)  # a plain read of the deque: taken under the lock below
        while True:
            with self._cond:
                while not self._queue and not self._stopping and time.monotonic() < idle_until:
                    self._cond.wait(idle_until - time.monotonic())
                if self._queue:
                    return self._queue.popleft()
            if self._stopping or self.sender.retire(self):
                return None

    def _run(self) -> None:
        device = self.sender.kv_cache.device
        if device.type == "cuda":  # a new thread starts on GPU 0 whatever the main thread chose
            torch.cuda.set_device(device)
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        # CUDA: a header posted after the first gather is posted from here, a stream that waits for the ids'
        # copy only (NCCL's stream waits for the poster's: from `side` the header would wait for the gather)
        self._header_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            while (item := self._next()) is not None:
                out, part = item
                out.trace.mark("pair thread picked it up")
                self._spin_until = time.monotonic() + self.sender.config.sender_spin_s  # for its layers
                try:
                    self.sender.part_done(out, self._send(out, part))
                except Exception as e:  # noqa: BLE001 - whatever broke, this transfer fails with the reason
                    self._drop_link(graceful=False)
                    reason = e.message if isinstance(e, TransferError) else f"{type(e).__name__}: {e}"
                    self.sender.fail(out, f"sending to rank {self.dst_rank} failed: {reason}")
            self._drop_link(graceful=True)

    def _send(self, out, part: SendSlice) -> int:
        """Send this rank's slice of the transfer; returns the bytes sent.

        NOTE (NCCL): nothing on the way to the first send waits for the receiver. Whether the receiver tore
        the pair down (a store round trip) is asked only once every message is posted, while they move; if
        it did, the posted sends can never complete: the group is aborted (which ends them) and the
        transfer is sent again, once, over a new pair.
        """
        tr = out.trace
        for attempt in range(2):
            link = self._ensure_link(out.transfer_id, out.deadline)
            tr.mark("link ready")
            num_bytes, done = (self._post_direct if link.direct else self._post)(out, part, link)
            if not link.check_after_posting:
                break
            is_open = attempt or link.is_open()
            tr.mark("receiver-closed check (store round trip)")
            if is_open:
                break
            self._drop_link(graceful=False)
        link.flush(out.deadline, done)
        tr.mark("every send completed (host saw it)")
        return num_bytes

    def _post(self, out, part: SendSlice, link: Link) -> tuple[int, torch.cuda.Event | None]:
        """Gather each message into staging and post its send; returns the bytes posted, and (a transfer
        launched from a CUDA graph) the event after its last send, which flush waits for.

        NOTE (CUDA): this thread's stream carries the gathers only; each send's completion is awaited on the
        link's own stream (TorchDistLink.send), so the gather of message k+1 runs while message k is sent,
        and a staging buffer is reused once the send that read it has completed. No host sync until flush.
        """
        sender, layout = self.sender, self.sender.layout
        num_heads = part.heads[1] - part.heads[0]
        lpm, bpm = message_shape(layout, len(out.block_ids), num_heads, sender.staging.buffer_bytes)
        unit = 2 * num_heads * layout.block_size * layout.head_dim * layout.torch_dtype.itemsize
        taper = sender.config.taper_bytes // unit if self._kind is TransportKind.TORCH else 0
        header = TransferHeader(out.transfer_id, len(out.block_ids), part.heads, lpm, bpm, max(taper, 0))
        plan = message_plan(layout.num_layers, header)
        tr = out.trace
        tr.mark("header built")
        # KV saved already (or about to be: the caller saves it right after start_send): the first gather goes
        # to the GPU before the header is posted, and the first byte moves that much sooner. Otherwise the
        # header goes now, so the receiver has posted its receives by the time the KV is there. With CUDA
        # graphs on, all of it saved in that time: the whole transfer goes from a graph.
        graphs_on = sender.config.cuda_graphs and link.graphs is not None
        poll_s = sender.config.kv_first_poll_s
        graph = graphs_on and out.poll_layers(layout.num_layers, poll_s)  # (polled already if graphs are on)
        kv_first = graph or out.poll_layers(plan[0].layers[1], 0.0 if graphs_on else poll_s)
        # Made here, on this worker's stream, so the prefill stream never waits for the copy.
        header_dev, index = self._stage_ids(header, out.block_ids)  # [HEADER_LEN], [n]
        tr.mark("header and block ids staged")
        hs = layout.heads[0]
        local_heads = (part.heads[0] - hs, part.heads[1] - hs)
        if graph:
            return self._post_graph(out, header, plan, local_heads, link, header_dev, index)
        if not kv_first:
            link.begin(header, out.deadline, header_dev)
            tr.mark("header posted")
        # device: sends complete on the link's stream (NCCL), not on this one
        done_stream = link.completion_stream
        num_bytes, waited = 0, 0
        for k, msg in enumerate(plan):
            out.wait_layers(waited, msg.layers[1], out.deadline, self._spin_until)
            waited = max(waited, msg.layers[1])
            buf = sender.staging.acquire(out.deadline)
            tr.mark("layers ready, staging acquired | gather may start", k, gpu=True)
            sent = None
            try:
                shape = (msg.layers[1] - msg.layers[0], 2, msg.blocks[1] - msg.blocks[0],
                         local_heads[1] - local_heads[0], layout.block_size, layout.head_dim)
                payload = buf.view(layout.torch_dtype, shape)  # [Lm, 2, nm, Hm, Bs, D]
                ops.gather_blocks_into(sender.kv_cache, index[msg.blocks[0]:msg.blocks[1]], payload,
                                       msg.layers, local_heads, sender.copy_programs)
                tr.mark("gather launched | done", k, gpu=True)
                if k == 0 and kv_first:
                    self._begin_beside(link, header, out.deadline, header_dev)
                    tr.mark("header posted")
                sent = link.send(header, msg, buf.data[:payload.nbytes], out.deadline)
                tr.mark("send posted | done", k, gpu=done_stream is not None, stream=done_stream)
            finally:
                sender.staging.release(buf, sent)
            num_bytes += payload.nbytes
        return num_bytes, None

    def _post_direct(self, out, part: SendSlice, link: Link) -> tuple[int, None]:
        """A direct link (IPC): announce the transfer, then copy layers into the receiver's blocks as they are
        saved, all that are saved at once (one copy for a whole send, one per layer while prefill runs), on
        this worker's stream. flush then waits for the copies and tells the receiver."""
        layout, sender = self.sender.layout, self.sender
        n = len(out.block_ids)
        header = TransferHeader(out.transfer_id, n, part.heads, layout.num_layers, n)
        link.begin(header, out.deadline, None)
        out.trace.mark("header posted")
        _, index = self._stage_ids(header, out.block_ids)  # while the receiver answers with its blocks
        hs = layout.heads[0]
        local_heads = (part.heads[0] - hs, part.heads[1] - hs)
        num_bytes, done = 0, 0
        while done < layout.num_layers:
            upto = max(out.layers_ready, done + 1)  # what is saved now, or else the next layer when it is
            out.wait_layers(done, upto, out.deadline, self._spin_until)
            num_bytes += link.write((done, upto), sender.kv_cache, index, local_heads, sender.copy_programs)
            out.trace.mark("copy launched | done", done, gpu=True)
            done = upto
        return num_bytes, None

    def _post_graph(self, out, header: TransferHeader, plan, local_heads, link: Link, header_dev,
                    index) -> tuple[int, torch.cuda.Event]:
        """The whole transfer, header first, from one CUDA graph (graphs.py) of this plan, captured on first
        use. It reads the header and block ids from this worker's device buffer (refilled just before, on this
        stream) and holds every staging buffer while it runs. Returns (bytes, event after the last send)."""
        sender, layout = self.sender, self.sender.layout
        out.wait_layers(0, layout.num_layers, out.deadline)  # this stream waits for the saved layers
        bufs = sender.staging.acquire_all(out.deadline)
        shapes = [(m.layers[1] - m.layers[0], 2, m.blocks[1] - m.blocks[0], local_heads[1] - local_heads[0],
                   layout.block_size, layout.head_dim) for m in plan]

        def enqueue() -> None:
            here = torch.cuda.current_stream()
            self._header_stream.wait_stream(here)
            with torch.cuda.stream(self._header_stream):  # the header does not wait for the first gather
                link.begin(header, out.deadline, header_dev)
            sent = []
            for k, msg in enumerate(plan):
                buf = bufs[k % len(bufs)]
                if k >= len(bufs):
                    here.wait_event(sent[k - len(bufs)])  # the buffer's previous send completed
                payload = buf.view(layout.torch_dtype, shapes[k])  # [Lm, 2, nm, Hm, Bs, D]
                ops.gather_blocks_into(sender.kv_cache, index[msg.blocks[0]:msg.blocks[1]], payload,
                                       msg.layers, local_heads, sender.copy_programs)
                sent.append(link.send(header, msg, buf.data[:payload.nbytes], out.deadline))
            here.wait_stream(self._header_stream)
            here.wait_stream(link.completion_stream)

        key = (header.num_blocks, header.heads, header.layers_per_message, header.blocks_per_message,
               header.taper_units, sender.copy_programs, self._ids_dev.data_ptr())
        done = torch.cuda.Event()
        try:
            captured = link.graphs.captured
            graph = link.graphs.get(key, lambda: capture(torch.cuda.current_stream(), enqueue))
            sender.stats.add(graph_transfers=1, graphs_captured=link.graphs.captured - captured)
            out.trace.mark("graph ready")
            graph.replay()
            out.trace.mark("graph launched (header, gathers, sends) | done", gpu=True)
        finally:
            done.record()
            for buf in bufs:
                sender.staging.release(buf, done)
        return sum(math.prod(shape) for shape in shapes) * layout.torch_dtype.itemsize, done

    def _begin_beside(self, link: Link, header: TransferHeader, deadline: float, header_dev) -> None:
        """Post the header after the first gather was launched, without waiting for that gather (CUDA)."""
        if self._header_stream is None:
            link.begin(header, deadline, header_dev)
            return
        self._header_stream.wait_event(self._ids_copied)
        with torch.cuda.stream(self._header_stream):
            link.begin(header, deadline, header_dev)

    def _stage_ids(self, header: TransferHeader, block_ids: list[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(header, block ids) on the cache's device as int64, from one host-to-device copy (CUDA; the
        header is None on CPU, where links build their own).

        NOTE (CUDA): through a pinned buffer this worker keeps, so no transfer allocates pinned memory or
        waits for the stream; the buffer is refilled only once its last copy has run (otherwise a new one is
        taken and the old one freed: the caching host allocator holds it until that copy ran).
        """
        device = self.sender.kv_cache.device
        if device.type != "cuda":
            return None, device_index(block_ids, device)
        n = HEADER_LEN + len(block_ids)
        host = self._ids_host
        if host is None or host.numel() < n or not self._ids_copied.query():
            size = host.numel() if host is not None and host.numel() >= n else max(2 * n, 1024)
            host = self._ids_host = torch.empty(size, dtype=torch.int64, pin_memory=True)
        values = host.numpy()
        values[:HEADER_LEN] = header.to_list()
        values[HEADER_LEN:n] = block_ids
        # NOTE: the device buffer is reused: its last readers are the previous transfer's gathers (earlier on
        # this stream) and its header's send, which completed before that transfer ended (flush), or was
        # aborted with its pair.
        if self._ids_dev is None or self._ids_dev.numel() < n:
            # room for any transfer of this cache's blocks (a CUDA graph keeps reading the same buffer)
            size = max(host.numel(), HEADER_LEN + self.sender.kv_cache.shape[2])
            self._ids_dev = torch.empty(size, dtype=torch.int64, device=device)
        staged = self._ids_dev[:n]
        staged.copy_(host[:n], non_blocking=True)
        self._ids_copied = torch.cuda.Event()
        self._ids_copied.record()
        return staged[:HEADER_LEN], staged[HEADER_LEN:]

    def _ensure_link(self, transfer_id: int, deadline: float) -> Link:
        link = self._link
        if link is not None and not link.check_after_posting and not link.is_open():
            self._drop_link(graceful=False)  # the receiver tore the pair down: rebuild it
        if self._link is None:
            # the first kind of the receiver's endpoints that reaches it from here (auto: IPC, else NCCL)
            endpoint = choose(self.endpoint, self.sender.kv_cache.device)
            self._kind = endpoint.kind
            link = open_link(endpoint, self.sender.kv_cache.device, self.sender.config)
            try:
                remote = link.connect(self.sender.layout, transfer_id, deadline)
            except Exception:
                link.close(graceful=False)
                raise
            self._link = link
            self.sender.stats.add(groups_created=1)
            if (remote.tp_size, remote.tp_rank) != (self.dst_tp_size, self.dst_rank):
                raise TransferError(f"endpoint {self.endpoint} is rank {remote.tp_rank} of {remote.tp_size}, "
                                    f"the destination names it rank {self.dst_rank} of {self.dst_tp_size}")
        return self._link

    def _drop_link(self, graceful: bool) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close(graceful)
            self.sender.stats.add(groups_torn_down=1)
