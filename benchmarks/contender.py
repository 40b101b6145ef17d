"""Running one benchmark contender in its own process: wall time and peak RSS from wait4.

The benchmark scripts that import this never import torch themselves, so a
child's peak RSS is its own (Linux keeps a forked child's RSS high-water mark
across exec, which would count a heavy parent's memory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_contender(label: str, command: list[str], cleanup: Path | None = None) -> dict:
    """Run `command` after removing `cleanup` and flushing dirty pages; raise SystemExit if it fails."""
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    os.sync()  # start each contender with no dirty pages left by the previous one
    load = os.getloadavg()[0]  # others' work on a shared machine: report it with each time
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        process = subprocess.Popen([str(c) for c in command], stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{label} failed:\n{log.read().decode(errors='replace')[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"label": label, "seconds": seconds, "cpu_seconds": cpu, "load": load, "peak_rss_mb": usage.ru_maxrss / 1024}


def scratch_folder(prefix: str, keep: bool) -> Path:
    """A new temporary folder for a benchmark's models, removed when the script exits (`keep`: left in place, named)."""
    import atexit

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if keep:
        print(f"models kept in {folder}", file=sys.stderr)
    else:
        atexit.register(shutil.rmtree, folder, True)
    return folder
