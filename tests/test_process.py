"""Whole-process behaviour: bounded memory, and interruption leaving no output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synthetic import write_llama_checkpoint, write_lora_adapter

SHAPE = dict(hidden=1024, intermediate=2816, heads=16)

# VmHWM, not ru_maxrss: the latter keeps the forking parent's RSS across exec.
_PEAK_RSS_SCRIPT = """
import json, re, sys
import lora_tools
report = lora_tools.merge(sys.argv[1], [sys.argv[2]], sys.argv[3], device="cpu", max_shard_size="64MB")
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"peak_kib": peak, "changed": report.tensors_changed}))
"""


def _peak_rss(tmp_path: Path, layers: int) -> dict:
    base = write_llama_checkpoint(tmp_path / f"base{layers}", vocab=4096, layers=layers, **SHAPE)
    adapter = write_lora_adapter(tmp_path / f"lora{layers}", layers=layers, rank=16, **SHAPE)
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_SCRIPT, base, adapter, tmp_path / f"out{layers}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_model_size(tmp_path):
    small, large = _peak_rss(tmp_path, 4), _peak_rss(tmp_path, 8)
    assert large["changed"] == 2 * small["changed"] == 56
    assert large["peak_kib"] < 1.10 * small["peak_kib"], (small, large)


@pytest.fixture(scope="module")
def slow_merge_inputs(tmp_path_factory):
    """Big enough that a merge takes a few seconds on two cores."""
    folder = tmp_path_factory.mktemp("interrupt")
    layers = 12
    base = write_llama_checkpoint(folder / "base", vocab=8192, layers=layers, max_shard_bytes=100_000_000, **SHAPE)
    adapter = write_lora_adapter(folder / "lora", layers=layers, rank=64, **SHAPE)
    return base, adapter


def _start_merge(base, adapter, out):
    return subprocess.Popen(
        [sys.executable, "-m", "lora_tools", "merge", base, adapter, "-o", out, "-q", "--max-shard-size", "50MB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_partial_output(out: Path, process, timeout: float = 60.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partial = list(out.parent.glob(f".{out.name}.loratool-tmp-*"))
        if partial and any(f.stat().st_size > 0 for f in partial[0].glob("*.safetensors")):
            return partial[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("the merge never started writing")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_midway_removes_everything(slow_merge_inputs, tmp_path, signum, code):
    base, adapter = slow_merge_inputs
    out = tmp_path / "out"
    process = _start_merge(base, adapter, out)
    _wait_for_partial_output(out, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_only_a_named_temporary_which_the_next_run_removes(slow_merge_inputs, tmp_path):
    base, adapter = slow_merge_inputs
    out = tmp_path / "out"
    process = _start_merge(base, adapter, out)
    partial = _wait_for_partial_output(out, process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert not out.exists()
    # the killed run's lock file stays too (the kernel released its lock); the next run takes it over
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, ".out.loratool-lock"])
    assert partial.name == f".out.loratool-tmp-{process.pid}"
    rerun = _start_merge(base, adapter, out)
    _, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_ENDING = """
import atexit, sys
from pathlib import Path
from lora_tools.cli import main

marks = Path(sys.argv[1])
atexit.register(lambda: (marks / "atexit").write_text("ran"))


class TornDown:
    def __del__(self):
        (marks / "teardown").write_text("ran")


keep = TornDown()  # freed only if the interpreter tears the modules down
sys.argv = ["loratool", *sys.argv[2:]]
main()
"""

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize(
    "args, code, stream, expected",
    [
        (["--version"], 0, "stdout", "loratool, version"),
        (["inspect", "no/such/folder"], 3, "stderr", "error: no/such/folder"),
        (["inspect", str(FIXTURES / "tiny-llama-lora"), "--json"], 0, "stdout", '"schema"'),
    ],
)
def test_the_cli_exits_with_its_status_without_tearing_python_down(tmp_path, args, code, stream, expected):
    """After the command: threads joined, atexit handlers run, output flushed, then the process ends at once
    (the teardown after importing torch takes about a second and writes nothing)."""
    done = subprocess.run(
        [sys.executable, "-c", _ENDING, tmp_path, *args], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    assert expected in getattr(done, stream)
    if args[-1] == "--json":
        assert json.loads(done.stdout)["schema"]  # all of it arrived
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()


def test_sigterm_while_a_thread_starts_leaves_that_thread_registered(monkeypatch):
    """SIGTERM's handler raises a BaseException (as SIGINT's KeyboardInterrupt): met just after a thread was
    started, an Exception would be caught by `Thread.start`, which then un-registers the running thread, and
    that thread dies printing a KeyError traceback (seen once copies started earlier in a merge)."""
    import threading

    from lora_tools.cli import app

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    real = threading._start_new_thread

    def started_then_signalled(function, arguments):
        real(function, arguments)
        app._raise_on_sigterm(signal.SIGTERM, None)

    monkeypatch.setattr(threading, "_start_new_thread", started_then_signalled)
    ran = threading.Event()
    thread = threading.Thread(target=ran.set)
    with pytest.raises(BaseException) as caught:
        thread.start()
    assert not isinstance(caught.value, Exception)
    assert ran.wait(10)
    thread.join(10)
    assert unraisable == [] and not thread.is_alive()
