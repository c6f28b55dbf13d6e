"""Peak resident memory (RSS) of a stretch of work, from the kernel's own marks (Linux only).

``before = reset_peak_rss()`` hands freed memory back to the OS (``malloc_trim``) and resets the kernel's peak-RSS
mark (``/proc/self/clear_refs``); after the work, ``peak_rss_rise_bytes(before)`` is how far the RSS peaked above
where it started.
"""

from __future__ import annotations

import ctypes
import gc
import re
from pathlib import Path


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_peak_rss() -> int:
    """Free what can be freed, reset the peak-RSS mark (VmHWM) to the current RSS; returns that RSS in KiB."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak RSS, to the current RSS
    return before


def peak_rss_rise_bytes(before_kib: int) -> int:
    """Bytes the RSS peaked above ``before_kib`` (what :func:`reset_peak_rss` returned)."""
    return (_status_kib("VmHWM") - before_kib) * 1024
