"""Pacing the kernel's writeback of a large output file as it is written.

Below the kernel's background-writeback threshold the page cache absorbs a whole
output and the kernel writes it back after the command returns, which is the
fastest thing to do. A larger output would pile up dirty pages until the kernel
throttles the writer (and the last seconds stall on the disk), so for those files
each finished range is handed to the disk at once (`sync_file_range(WRITE)`, which
does not wait), and once more than a window of bytes is in flight the oldest range
is waited for and dropped from the cache (`posix_fadvise(DONTNEED)`), keeping the
dirty and cached bytes of the output near the window.

Durability: loratool never fsyncs. When a command returns, the output is complete
and in place (renamed atomically), and readable by every process; its bytes reach
the disk within the kernel's writeback interval (about 30 s by default). Run `sync`
after the command when the output must survive a power loss at once.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from functools import cache

from .. import libc, trace

__all__ = ["Writeback", "background_threshold"]

_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4
WINDOW_BYTES = 512 << 20


def _sync_file_range():
    """libc's sync_file_range, or None where it does not exist (not Linux, no glibc)."""
    return libc.function("sync_file_range")


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/meminfo")


@cache
def background_threshold() -> int | None:
    """Dirty bytes at which the kernel starts background writeback, or None where unknown."""
    try:
        with open("/proc/sys/vm/dirty_background_bytes") as f:
            absolute = int(f.read())
        if absolute:
            return absolute
        with open("/proc/sys/vm/dirty_background_ratio") as f:
            ratio = int(f.read())
        return _meminfo("MemAvailable") * ratio // 100
    except (OSError, ValueError):
        return None


class Writeback:
    """Hands finished ranges of one file to the disk as they complete, for files over `threshold` bytes."""

    def __init__(self, fd: int, file_bytes: int, threshold: int | None = None, window: int = WINDOW_BYTES) -> None:
        limit = background_threshold() if threshold is None else threshold
        self.fd, self.window = fd, window
        self.active = limit is not None and file_bytes > limit and _sync_file_range() is not None
        self._in_flight: deque[tuple[int, int]] = deque()
        self._in_flight_bytes = 0
        self._lock = threading.Lock()  # copies and computes finish on different threads

    def finished(self, offset: int, nbytes: int) -> None:
        """`nbytes` at `offset` hold their final bytes: start writing them; retire old ranges past the window."""
        if not self.active or nbytes == 0:
            return
        with self._lock:
            self._finished(offset, nbytes)

    def _finished(self, offset: int, nbytes: int) -> None:
        sync = _sync_file_range()
        sync(self.fd, offset, nbytes, _WRITE)
        self._in_flight.append((offset, nbytes))
        self._in_flight_bytes += nbytes
        while self._in_flight_bytes > self.window and len(self._in_flight) > 1:
            old_offset, old_bytes = self._in_flight.popleft()
            self._in_flight_bytes -= old_bytes
            with trace.span("writeback wait", f"{old_bytes >> 20} MiB"):
                sync(self.fd, old_offset, old_bytes, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
            os.posix_fadvise(self.fd, old_offset, old_bytes, os.POSIX_FADV_DONTNEED)
