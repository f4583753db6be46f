"""How much memory this machine has left, read without importing torch (validation runs before it)."""
from __future__ import annotations

import os


def host_memory_available() -> int:
    """Bytes this machine can still allocate without swapping (Linux: MemAvailable; elsewhere: free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
