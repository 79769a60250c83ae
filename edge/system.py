"""Facts about this process and machine that every layer needs: threads, peak memory.

A base module: it imports nothing from edge, so convert, quantize, telemetry and bench can
all use it without reaching up into the llama.cpp session.
"""

from __future__ import annotations

import os
import resource
import sys


def default_threads() -> int:
    """Physical cores: llama.cpp decode is memory-bound and SMT siblings only contend."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil can fail in odd containers
        n = None
    return max(1, n or os.cpu_count() or 1)


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
