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

from lora_tools import launch, trace
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


# --- the console script's early start -------------------------------------------------


@pytest.mark.parametrize(
    ("words", "computes"),
    [
        (["merge", "base", "lora", "-o", "out"], True),
        (["--color", "never", "unmerge", "merged", "lora", "-o", "out"], True),
        (["--color=always", "extract", "base", "tuned", "-r", "8", "-o", "out"], True),
        (["resize", "lora", "-r", "4", "-o", "out"], True),
        (["combine", "a", "b", "-o", "out"], True),
        (["merge", "base", "lora", "-o", "out", "--dry-run"], False),
        (["merge", "--help"], False),
        (["extract", "-h"], False),
        (["inspect", "merge"], False),
        (["convert", "lora", "-o", "out"], False),
        (["--version"], False),
        (["--color"], False),
        ([], False),
    ],
)
def test_the_launcher_reads_which_commands_compute(words, computes):
    assert launch.computes(words) is computes


def test_the_console_script_starts_the_load_before_importing_the_cli(tmp_path):
    """`launch.main` (the `loratool` script) starts the load before click, rich and the CLI are
    imported, with the Hub's progress bars already silenced for -q; the merge then runs as always."""
    write_llama_checkpoint(tmp_path / "base", vocab=96, **SHAPE)
    write_lora_adapter(tmp_path / "lora", rank=4, **SHAPE)
    record = tmp_path / "at-start.json"
    code = f"""
        import json, os, sys
        from lora_tools.compute import preload
        original = preload.start
        def start():  # the first call is the launcher's (the CLI calls it again, and then it does nothing)
            seen = {{m: m in sys.modules for m in ("click", "rich", "lora_tools.cli", "lora_tools.merging")}}
            seen["quiet"] = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
            if not os.path.exists({str(record)!r}):
                with open({str(record)!r}, "w") as f:
                    json.dump(seen, f)
            return original()
        preload.start = start
        sys.argv = ["loratool", "merge", {str(tmp_path / "base")!r}, {str(tmp_path / "lora")!r},
                    "-o", {str(tmp_path / "out")!r}, "-q"]
        from lora_tools.launch import main
        main()
    """
    environment = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(record.read_text()) == {
        "click": False, "rich": False, "lora_tools.cli": False, "lora_tools.merging": False, "quiet": "1"
    }  # fmt: skip
    assert "merged 1 adapter(s)" in done.stderr and (tmp_path / "out" / "model.safetensors").is_file()


def test_quieting_the_hub_waits_for_a_load_in_progress():
    """The CLI sets the Hub's quiet variable only once no load runs: glibc's setenv is not safe
    while another thread's dlopen runs the libraries' initializers, which read the environment."""
    code = """
        import json, os
        from lora_tools.compute import preload
        preload.start()
        from lora_tools.cli.running import silence_hub_progress as _silence_hub_progress
        running = preload._helper.is_alive()
        _silence_hub_progress(True)
        print(json.dumps(dict(running=running, after=preload._helper.is_alive(),
                              quiet=os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))))
    """
    result = _python(code, HF_HUB_DISABLE_PROGRESS_BARS="0")
    assert result["running"] and result["after"] is False and result["quiet"] == "1", result


def test_output_files_are_created_while_the_load_runs():
    """Reserving an output file's space and starting its writeback call libc through ctypes; a lookup there
    takes the dynamic loader's lock, which the load holds: `start` looks them all up first, so the copies of a
    merge start while torch's libraries are still loading (they once waited 0.1–0.2 s for it)."""
    code = """
        import json, os, tempfile
        from lora_tools.compute import preload
        from lora_tools.io.storage import reserve
        from lora_tools.io.writeback import Writeback
        from lora_tools import libc
        preload.start()
        with tempfile.TemporaryFile() as f:
            reserved = reserve(f.fileno(), 1 << 20, "out")
            paced = Writeback(f.fileno(), 1 << 20, threshold=0).active
            running = preload._helper.is_alive()
            size = os.fstat(f.fileno()).st_size
        preload.finish()
        print(json.dumps(dict(running=running, size=size, paced=paced, found=libc.function.cache_info().currsize)))
    """
    result = _python(code)
    assert result["running"], result  # neither call waited for the load
    assert result["size"] == 1 << 20 and result["paced"] and result["found"] >= 4, result


def test_a_local_merge_imports_no_network_module_before_torch():
    """The CLI and a merge's planning import neither `socket` nor `email` (the Hub's retry reads an HTTP date
    with them only when asked to wait): on a cold start they took 0.14 s before the first copy."""
    code = """
        import json, sys
        import lora_tools.cli, lora_tools.commands.merge, lora_tools.merging.run
        print(json.dumps({m: m in sys.modules for m in ("socket", "email.utils")}))
    """
    assert _python(code) == {"socket": False, "email.utils": False}
