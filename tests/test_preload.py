"""Loading torch's libraries while a command plans: off the GIL, the same torch after, never in the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from synthetic import write_llama_checkpoint, write_lora_adapter

from lora_tools import trace
from lora_tools.compute import preload

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is for Linux wheels")

SHAPE = dict(hidden=64, intermediate=160, layers=2, heads=4)


def _python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (torch not imported); it prints one JSON line."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | env
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


LOAD_AND_IMPORT = """
    import json, os, sys, time
    from lora_tools.compute import preload
    from lora_tools.compute.pool import import_torch, usable_cores
    begin = time.perf_counter()
    started = preload.start()
    again = preload.start()
    # the main thread keeps running Python while the helper is inside dlopen: no long pause anywhere
    last, pause, helper = begin, 0.0, preload._helper
    while helper.is_alive():
        now = time.perf_counter()
        last, pause = now, max(pause, now - last)
    load = time.perf_counter() - begin
    pause = max(pause, time.perf_counter() - last)
    preload.finish()
    maps = open("/proc/self/maps").read()
    loaded = "libtorch_cpu.so" in maps and "torch" not in sys.modules
    environment = os.environ.get("OMP_NUM_THREADS")
    torch = import_torch()
    print(json.dumps(dict(
        started=started, again=again, loaded=loaded, environment=environment,
        pause=pause, load=load, sum=float(torch.ones(3).sum()),
        threads=torch.get_num_threads(), cores=usable_cores(),
    )))
"""


@pytest.mark.parametrize("omp", [None, "3"])
def test_preload_loads_libtorch_without_the_gil_and_torch_imports_as_before(omp):
    result = _python(LOAD_AND_IMPORT, **({} if omp is None else {"OMP_NUM_THREADS": omp}))
    assert result["started"] and not result["again"]  # once per process
    assert result["loaded"]  # libtorch_cpu mapped, torch's Python modules not yet imported
    assert result["environment"] == omp  # OMP_NUM_THREADS is back to what the user had
    # The main thread never paused for long: holding the GIL in dlopen (as `ctypes.CDLL` does) would
    # stop it for the whole load.
    assert result["pause"] < 0.5 * result["load"], result
    assert result["sum"] == 3.0 and result["threads"] == result["cores"]


def test_preload_is_skipped_once_torch_is_imported_or_not_found(monkeypatch):
    import torch  # noqa: F401  (the test process has torch)

    assert not preload.start()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(preload.importlib.util, "find_spec", lambda name: None)
    assert not preload.start() and preload._helper is None
    preload.finish()  # nothing to wait for


def _traced_cli_merge(folder: Path, *options: str) -> list[dict]:
    """`python -m lora_tools merge` on a tiny Llama and LoRA in `folder`, traced; returns the trace events."""
    write_llama_checkpoint(folder / "base", vocab=96, **SHAPE)
    write_lora_adapter(folder / "lora", rank=4, **SHAPE)
    events_file = folder / "trace.jsonl"
    command = [sys.executable, "-m", "lora_tools", "merge", folder / "base", folder / "lora", "-o", folder / "out",
               *options]  # fmt: skip
    env = {**os.environ, "LORATOOL_TRACE": str(events_file)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in events_file.read_text().splitlines()]


def test_the_merge_command_loads_torch_libraries_while_it_plans(tmp_path):
    events = _traced_cli_merge(tmp_path)
    spans = trace.summary(events)
    loaded, imported = spans["load torch libraries"], spans["import torch"]
    assert loaded["count"] == 1 and loaded["thread_cpu"] > 0
    planned = next(e["t"] for e in events if e["name"] == "planned")
    assert loaded["first"] < planned  # started before planning ended, so the two overlap
    assert loaded["first"] + loaded["seconds"] <= imported["first"] + imported["seconds"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_dry_run_does_not_load_torch(tmp_path):
    names = {event["name"] for event in _traced_cli_merge(tmp_path, "--dry-run")}
    assert "load torch libraries" not in names and not Path(tmp_path / "out").exists()
