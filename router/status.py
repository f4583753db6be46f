"""`pdserve status`: a running server's pools and workers, from its HTTP `/v1/status`."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from pdserve.errors import WorkerFailedError


def fetch_status(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> dict:
    request = urllib.request.Request(url.rstrip("/") + "/v1/status")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise WorkerFailedError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:200]}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise WorkerFailedError(f"{url}: cannot reach the server ({getattr(e, 'reason', e)})") from None


def format_status(status: dict) -> str:
    lines = [f"model {status['model']}  serving: {'yes' if status['serving'] else 'no'}  "
             f"running {status['running']}  queued {status['queued']}"]
    header = (f"{'pool':<10} {'worker':<12} {'node':<14} {'pid':>7} {'health':<8} {'kv blocks':>15} "
              f"{'run':>4} {'wait':>4}")
    lines.append(header)
    for pool in status["pools"]:
        for w in pool["workers"]:
            blocks = f"{w['kv_blocks_used']}/{w['kv_blocks_total']}"
            health = "ok" if w["healthy"] else "dead"
            lines.append(f"{pool['role']:<10} {w['name']:<12} {w['node'][:12]:<14} {w['pid']:>7} {health:<8} "
                         f"{blocks:>15} {w['running']:>4} {w['waiting']:>4}")
    return "\n".join(lines)
