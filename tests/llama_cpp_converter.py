"""Restore llama.cpp's own converters (the oracle for GGUF LoRA layouts) from the llama-cpp-python sdist.

llama-cpp-python vendors llama.cpp; its source distribution on PyPI carries
`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`, the `conversion/` package they share
(one module per model family) and `gguf-py/`. This script fetches that sdist with pip
(`pip download --no-deps --no-binary :all:`) and extracts only those paths into a
git-ignored folder, `.cache/llama_cpp/<version>/`; nothing of it is copied into the project.
Tests run `convert_lora_to_gguf.py` as a subprocess with the vendored `gguf-py` first on
`PYTHONPATH` (see `lora_command`).

    python tests/llama_cpp_converter.py          # restore (once), print the folder
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = ["VERSION", "CACHE", "restore", "lora_command", "convert_loras"]

#: llama-cpp-python release whose vendored llama.cpp is the oracle (bump to follow llama.cpp).
VERSION = "0.3.36"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "llama_cpp"
_WANTED = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml")


def _members(archive: tarfile.TarFile, root: str):
    for member in archive.getmembers():
        inner = member.name.removeprefix(root)
        if member.isfile() and inner != member.name and inner.startswith(_WANTED):
            member.name = inner
            yield member


def restore(version: str = VERSION, cache: Path = CACHE) -> Path:
    """The folder holding llama.cpp's converters for `version`, fetched and extracted on first use."""
    target = cache / version
    if (target / "convert_lora_to_gguf.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "-d", scratch],
            check=True,
        )  # fmt: skip
        sdist = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        unpacked = Path(scratch) / "unpacked"
        with tarfile.open(sdist) as archive:
            root = f"{archive.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            archive.extractall(unpacked, members=list(_members(archive, root)), filter="data")
        if not (unpacked / "convert_lora_to_gguf.py").is_file():
            raise FileNotFoundError(f"llama-cpp-python {version}: no vendor/llama.cpp/convert_lora_to_gguf.py")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    return target


def lora_command(converter: Path, adapter: Path, base: Path, output: Path) -> tuple[list[str], dict[str, str]]:
    """argv and environment that run llama.cpp's `convert_lora_to_gguf.py` on a PEFT folder (f32 output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(converter / "gguf-py"), str(converter)]))
    env.pop("NO_LOCAL_GGUF", None)
    argv = [sys.executable, str(converter / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base),
            "--outfile", str(output), "--outtype", "f32"]  # fmt: skip
    return argv, env


#: Runs convert_lora_to_gguf.py once per job in one interpreter (imports paid once): argv = [script, jobs.json].
_BATCH = """
import json, runpy, sys, traceback
script, listing = sys.argv[1], sys.argv[2]
jobs = json.load(open(listing))
results = []
for argv in jobs:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        results.append({"rc": 0, "error": ""})
    except SystemExit as exc:
        results.append({"rc": exc.code if isinstance(exc.code, int) else 1, "error": "exit"})
    except BaseException as exc:
        results.append({"rc": 1, "error": "".join(traceback.format_exception_only(exc)).strip()})
json.dump(results, open(listing, "w"))
"""


def convert_loras(converter: Path, jobs: list[tuple[Path, Path, Path]], scratch: Path) -> list[dict]:
    """Run llama.cpp's convert_lora_to_gguf.py on each (adapter, base, output), f32, in one process.

    Returns per job {"rc": 0 or not, "error": the exception it stopped with}.
    """
    listing = scratch / "llama_cpp_jobs.json"
    argvs = [[str(a), "--base", str(b), "--outfile", str(o), "--outtype", "f32"] for a, b, o in jobs]
    listing.write_text(json.dumps(argvs))
    env = lora_command(converter, Path(), Path(), Path())[1]
    script = str(converter / "convert_lora_to_gguf.py")
    subprocess.run([sys.executable, "-c", _BATCH, script, str(listing)], env=env, check=True, capture_output=True)
    return json.loads(listing.read_text())


if __name__ == "__main__":
    print(restore(sys.argv[1] if len(sys.argv) > 1 else VERSION))
