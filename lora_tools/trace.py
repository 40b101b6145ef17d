"""A phase timeline of one command, for finding where wall time goes (LORATOOL_TRACE=1).

With `LORATOOL_TRACE` set, `span` and `mark` record events (seconds since the
process started, the thread, CPU seconds of the process so far) and the timeline
is printed to stderr when the process exits, followed by per-phase totals:

    LORATOOL_TRACE=1 loratool merge base lora -o out

`LORATOOL_TRACE=FILE` writes the events as JSON lines to FILE instead. Without the
variable both calls cost one attribute test. Nothing here needs torch.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["enabled", "span", "ended", "mark", "events", "summary", "start"]


def _process_age() -> float:
    """Seconds since this process started (Linux), 0 where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class _Trace:
    def __init__(self) -> None:
        self.enabled = False
        self.destination = ""
        self.origin = 0.0
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def record(self, kind: str, name: str, detail: str, started: float | None = None, thread_cpu: float = 0.0) -> None:
        now = time.perf_counter()
        event = {
            "t": round(now - self.origin, 4),
            "thread": threading.current_thread().name,
            "kind": kind,
            "name": name,
            "detail": detail,
            "cpu": round(time.process_time(), 3),
        }
        if started is not None:
            event["start"] = round(started - self.origin, 4)
            event["seconds"] = round(now - started, 4)
            event["thread_cpu"] = round(time.thread_time() - thread_cpu, 4)
        with self._lock:
            self.events.append(event)


_TRACE = _Trace()


def start(destination: str | None = None) -> None:
    """Begin recording (done at import when LORATOOL_TRACE is set); `destination`: "1" for stderr, or a file."""
    value = destination if destination is not None else os.environ.get("LORATOOL_TRACE", "")
    if not value or value == "0" or _TRACE.enabled:
        return
    _TRACE.enabled, _TRACE.destination = True, value
    _TRACE.origin = time.perf_counter() - _process_age()
    _TRACE.record("mark", "trace started", "")
    atexit.register(_report)


def enabled() -> bool:
    return _TRACE.enabled


def mark(name: str, detail: str = "") -> None:
    """Record that `name` happened now."""
    if _TRACE.enabled:
        _TRACE.record("mark", name, detail)


@contextmanager
def span(name: str, detail: str = "") -> Iterator[None]:
    """Record how long the block took (also when it raises)."""
    if not _TRACE.enabled:
        yield
        return
    started, thread_cpu = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        _TRACE.record("span", name, detail, started, thread_cpu)


def ended(name: str, detail: str, started: tuple[float, float]) -> None:
    """Record a span that began at `started` (`time.perf_counter()`, `time.thread_time()` then, on
    this thread) and ends now, for work that does not fit one `with` block (it starts in one step
    of a loop and ends in the next)."""
    if _TRACE.enabled:
        _TRACE.record("span", name, detail, *started)


def events() -> list[dict]:
    with _TRACE._lock:
        return list(_TRACE.events)


def summary(recorded: list[dict]) -> dict[str, dict]:
    """Per span name: count, total seconds, first start and last end (seconds since the process started)."""
    totals: dict[str, dict] = defaultdict(
        lambda: {"count": 0, "seconds": 0.0, "thread_cpu": 0.0, "first": None, "last": None}
    )
    for event in recorded:
        if event["kind"] != "span":
            continue
        entry = totals[event["name"]]
        entry["count"] += 1
        entry["seconds"] += event["seconds"]
        entry["thread_cpu"] += event["thread_cpu"]
        entry["first"] = event["start"] if entry["first"] is None else min(entry["first"], event["start"])
        entry["last"] = event["t"] if entry["last"] is None else max(entry["last"], event["t"])
    return dict(totals)


def _report() -> None:
    _TRACE.record("mark", "exit", "")
    recorded = events()
    if _TRACE.destination != "1":
        with open(_TRACE.destination, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in recorded)
        return
    write = sys.stderr.write
    write("loratool trace (seconds since the process started; cpu = process CPU seconds so far)\n")
    for e in recorded:
        begun = f"{e['start']:8.3f}→" if "start" in e else " " * 9
        write(f"{begun}{e['t']:8.3f}  cpu {e['cpu']:7.2f}  {e['thread'][:22]:22} {e['name']} {e['detail']}\n")
    write("phase totals: name, count, seconds summed, its thread's CPU seconds, first start → last end\n")
    for name, s in sorted(summary(recorded).items(), key=lambda item: item[1]["first"]):
        write(
            f"  {name:28} {s['count']:5} {s['seconds']:8.3f} {s['thread_cpu']:8.3f}  "
            f"{s['first']:8.3f} → {s['last']:8.3f}\n"
        )


start()
