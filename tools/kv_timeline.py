"""One traced transfer's timeline (`--trace`): both sides' marks on one clock, a table, and where the time
went.

Each mark (kv_transfer/trace.py) has the host time at which a thread passed a stage and, where the stage
recorded a CUDA event, the time the GPU got there (on the host clock, anchored per process; within a few
µs). Stage names read "host part | device part": "send posted | done" was posted at the host time and
completed at the device time. Times are µs since the sender's clock started (just before start_send).
"""
from __future__ import annotations

# Points on the receiver's side whose intervals add up to the whole transfer (the measured time). A point
# a run did not record (no device times on gloo; gloo has no header event) is skipped, and the interval
# then spans to the next one. (label, stage, message: None any / 0 first / -1 last, device?, only on:
# "cuda" / "gloo" / None both, what the interval up to this point holds)
CRITICAL_PATH = [
    ("header landed on the receiving GPU", "header recv posted | landed", None, True, "cuda",
     "sender host work up to the header, the header message"),
    ("receiver got the header", "header received (host)", None, False, "gloo",
     "sender host work up to the header, the header message"),
    ("receiver host saw the header", "header seen by host (event wait returned)", None, False, "cuda",
     "receiver thread wake-up on the header event"),
    ("receiver posted recv 0", "recv posted | may start", 0, False, None,
     "receiver host work from the header to the first recv"),
    ("recv 0 complete on the GPU", "recv awaited | done", 0, True, "cuda",
     "first message: waits for the sender's first gather and send, then moves"),
    ("recv 0 complete", "recv awaited | done", 0, False, "gloo", "first message"),
    ("last recv complete on the GPU", "recv awaited | done", -1, True, "cuda",
     "the other messages; compare the wire time at the 1-send rate"),
    ("last recv complete", "recv awaited | done", -1, False, "gloo", "the other messages"),
    ("last scatter complete on the GPU", "scatter launched | done", -1, True, "cuda", "last scatter"),
    ("last scatter done", "scatter launched | done", -1, False, "gloo", "last scatter"),
    ("receiver host saw the last scatter", "last scatter seen by host (event wait returned)", None, False,
     "cuda", "receiver thread wake-up on the scatter event"),
    ("finished_at", "DONE (finished_at)", None, False, None, "bookkeeping up to finished_at"),
]
# The sender's side, for reference: (label, stage, message, device?)
SENDER_POINTS = [
    ("pair thread picked the transfer up", "pair thread picked it up", None, False),
    ("header posted", "header posted", None, False),
    ("gather 0 could start on the GPU", "layers ready, staging acquired | gather may start", 0, True),
    ("gather 0 launched", "gather launched | done", 0, False),
    ("gather 0 done on the GPU", "gather launched | done", 0, True),
    ("send 0 posted", "send posted | done", 0, False),
    ("send 0 complete on the GPU", "send posted | done", 0, True),
    ("last send posted", "send posted | done", -1, False),
    ("last send complete on the GPU", "send posted | done", -1, True),
    ("sender host saw every send complete", "every send completed (host saw it)", None, False),
]


def merge(send: list[dict], recv: list[dict], origin_ns: int) -> list[dict]:
    """Both sides' marks (Trace.timeline()) in host order, in µs since origin_ns: side, stage, k, host_us,
    device_us (None without an event), gap_us (host time since the row before), thread."""
    rows, prev = [], None
    for m in sorted(send + recv, key=lambda m: m["host_ns"]):
        host = (m["host_ns"] - origin_ns) / 1e3
        device = None if m["device_ns"] is None else (m["device_ns"] - origin_ns) / 1e3
        rows.append({"side": m["side"], "stage": m["stage"], "k": m["k"], "host_us": round(host, 1),
                     "device_us": None if device is None else round(device, 1),
                     "gap_us": round(host - (host if prev is None else prev), 1), "thread": m["thread"]})
        prev = host
    return rows


def _at(rows: list[dict], side: str, stage: str, k: int | None, device: bool) -> float | None:
    hits = [r for r in rows if r["side"] == side and r["stage"] == stage]
    if k is not None and hits:
        ks = [r["k"] for r in hits]
        want = max(ks) if k < 0 else k
        hits = [r for r in hits if r["k"] == want]
    if not hits:
        return None
    return hits[0]["device_us" if device else "host_us"]


def critical_path(rows: list[dict]) -> list[dict]:
    """Intervals between the receiver's points present in `rows`, from 0; they add up to finished_at."""
    out, prev_t, prev_label = [], 0.0, "sender start"
    backend = "cuda" if any(r["device_us"] is not None for r in rows) else "gloo"
    for label, stage, k, device, only, what in CRITICAL_PATH:
        t = _at(rows, "recv", stage, k, device) if only in (None, backend) else None
        if t is None:
            continue
        out.append({"from": prev_label, "to": label, "what": what, "us": round(t - prev_t, 1), "at_us": t})
        prev_t, prev_label = t, label
    return out


def sender_points(rows: list[dict]) -> list[dict]:
    out = []
    for label, stage, k, device in SENDER_POINTS:
        t = _at(rows, "send", stage, k, device)
        if t is not None:
            out.append({"point": label, "at_us": t})
    return out


def analyse(send: list[dict], recv: list[dict], origin_ns: int, wire_us: float) -> dict:
    rows = merge(send, recv, origin_ns)
    sends = [r["k"] for r in rows if r["stage"] == "recv awaited | done"]
    return {"wire_us": round(wire_us, 1), "messages": 1 + max(sends, default=-1),
            "timeline": rows, "critical_path": critical_path(rows), "sender_points": sender_points(rows)}


def _f(v: float | None, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.1f}"


def format_trace(t: dict) -> str:
    """The table of one traced transfer, then its critical path and the sender's points."""
    lines = [f"  timeline: {t['tokens']} tokens ({t['bytes'] / 2**20:.1f} MiB, {t['messages']} message(s)), the "
             f"median of {t['traced']} traced transfers (id {t['transfer_id']}): {t['duration_us']:.0f} µs "
             f"(untraced median {t['untraced_median_us']:.0f}); wire time at the 1-send rate "
             f"{t['wire_us']:.0f} µs",
             f"  {'side':<4} {'msg':>3} {'stage (host | device)':<52} {'host µs':>9} {'device µs':>10} "
             f"{'gap µs':>8} {'dev-host':>9}"]
    for r in t["timeline"]:
        lag = None if r["device_us"] is None else r["device_us"] - r["host_us"]
        k = "" if r["k"] is None else str(r["k"])
        lines.append(f"  {r['side']:<4} {k:>3} {r['stage'][:52]:<52} {_f(r['host_us'], 9)} "
                     f"{_f(r['device_us'], 10)} {_f(r['gap_us'], 8)} {_f(lag, 9)}")
    lines.append("  critical path (receiver's view; the intervals add up to the measured time):")
    for c in t["critical_path"]:
        lines.append(f"    {c['us']:>9.1f} µs  -> {c['to']:<36} at {c['at_us']:>8.1f}  ({c['what']})")
    overhead = t["duration_us"] - t["wire_us"]
    lines.append(f"    total {t['duration_us']:.1f} µs = wire {t['wire_us']:.1f} + {overhead:.1f} µs more")
    lines.append("  sender, µs since start: " + "; ".join(f"{p['point']} {p['at_us']:.1f}"
                                                       for p in t["sender_points"]))
    return "\n".join(lines)
