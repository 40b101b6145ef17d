"""Running a benchmark contender cold and inside a memory cgroup, measuring its peak anonymous memory.

- `drop_caches`: `sync` then `echo 3 > /proc/sys/vm/drop_caches` (root), so a contender reads from the disk.
- `MemoryCgroup`: a fresh memory cgroup (v2 where the machine has it, else v1), written directly under
  /sys/fs/cgroup (no systemd-run needed); its limit counts the page cache, as the kernel charges it.
- `run_limited`: one contender in its own process, in the cgroup when one is given, with its wall time,
  peak anonymous memory (the cgroup's anon, sampled every 10 ms: page cache and mapped files excluded),
  peak RSS, and its outcome ("ok", or "killed (out of memory)").

Like `contender.py`, nothing here imports torch.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["drop_caches", "MemoryCgroup", "run_limited", "parse_bytes"]

_ROOT = Path("/sys/fs/cgroup")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_numbers = itertools.count()


def parse_bytes(text: str) -> int:
    """'2GiB' → 2147483648, '8GB' → 8000000000."""
    text = text.strip().upper()
    digits = text.rstrip("KMGIB")
    return int(float(digits) * _UNITS[text[len(digits) :]])


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _cgroup_v2_root() -> Path | None:
    """Where a v2 hierarchy with the memory controller is mounted (the unified root, or a hybrid's), if any."""
    for root in (_ROOT, _ROOT / "unified"):
        controllers = root / "cgroup.controllers"
        if controllers.exists() and "memory" in controllers.read_text().split():
            return root
    return None


class MemoryCgroup:
    """A memory cgroup of its own for one contender: limit `limit` bytes (None: no limit, measurement only)."""

    def __init__(self, limit: int | None) -> None:
        name = f"loratool-bench-{os.getpid()}-{next(_numbers)}"
        v2 = _cgroup_v2_root()
        self.version = 2 if v2 is not None else 1
        self.path = (v2 if v2 is not None else _ROOT / "memory") / name
        self.path.mkdir()
        if self.version == 2:
            (self.path / "memory.max").write_text("max" if limit is None else str(limit))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        else:
            if limit is not None:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
            (self.path / "memory.swappiness").write_text("0")

    def enter(self) -> None:
        """Move the calling process (a child before exec) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def anon_bytes(self) -> int:
        """Anonymous memory charged to the cgroup now (v1: total_rss; v2: anon)."""
        key = "anon" if self.version == 2 else "total_rss"
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
        return 0

    def out_of_memory_kills(self) -> int:
        if self.version == 2:
            events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
            return int(events.get("oom_kill", 0))
        control = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return int(control.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(50):  # the kernel frees the cgroup once its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_limited(
    label: str, command: list, cleanup: Path | None, *, limit: int | None, cold: bool, cgroups: bool = True
) -> dict:
    """Run one contender (after removing `cleanup`; caches dropped first when `cold`), in a cgroup of its own.

    Returns label, seconds, cpu_seconds, peak_rss_mb (wait4), peak_anon_mb (None without cgroups),
    outcome ("ok", "killed (out of memory)", or "failed (exit N)") and the tail of stderr when not ok.
    """
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    if cold:
        drop_caches()
    else:
        os.sync()
    group = MemoryCgroup(limit) if cgroups else None
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], group.anon_bytes())

    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [str(c) for c in command], stdout=subprocess.DEVNULL, stderr=log,
            preexec_fn=group.enter if group is not None else None,
        )  # fmt: skip
        sampler = threading.Thread(target=sample, daemon=True)
        if group is not None:
            sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        if group is not None:
            sampler.join()
        code = os.waitstatus_to_exitcode(status)
        result = {
            "label": label, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak[0] / 2**20 if group is not None else None,
            "load": os.getloadavg()[0], "outcome": "ok",
        }  # fmt: skip
        if code != 0:
            killed = group is not None and group.out_of_memory_kills() > 0
            result["outcome"] = "killed (out of memory)" if killed else f"failed (exit {code})"
            log.seek(0)
            result["stderr"] = log.read().decode(errors="replace")[-2000:]
    if group is not None:
        group.remove()
    return result
