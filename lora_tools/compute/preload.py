"""Loading torch's shared libraries on a helper thread while a command reads its inputs.

About a fifth of `import torch` (0.25–0.4 s here) is the dynamic loader: mapping and
relocating libtorch_cpu (≈430 MB) and running its static initializers. libc's `dlopen`,
called as a ctypes foreign function, runs without the GIL, so a command that will compute
starts that load first (`launch`, before the CLI's modules are imported; else
`cli.running.before_computing`), and it runs on another core while the main thread imports the CLI
and plans. The import later finds the library in place and only runs torch's Python modules.

The load mirrors what the import itself does, so torch ends up the same:
- torch's global dependencies (`libtorch_global_deps`, which brings OpenMP) are opened first,
  with RTLD_GLOBAL, synchronously, with OMP_NUM_THREADS at 1 while OpenMP reads it (as
  `pool.single_threaded_torch` sets it for the import), and the environment restored at once;
- libtorch_cpu is then opened RTLD_LOCAL on the helper thread, as a dependency of
  `torch._C` would be; `torch._C` then resolves to the library already loaded.

Nothing here imports torch, and no failure is raised: where the libraries are not
where a Linux wheel puts them, or loading fails, `import torch` later does its usual
work and reports any error itself. The main thread must not change the process
environment while the helper runs (the libraries' initializers read it): `finish()`
waits for the helper and is called before anything sets a variable.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from contextlib import suppress
from pathlib import Path

from .. import libc, trace

__all__ = ["finish", "start"]

_helper: threading.Thread | None = None

# The standard library's compiled modules that the CLI (click, rich) and the planning of a
# command import (json, datetime, uuid, hashlib, tempfile, shutil, subprocess, random …), found
# by tracing a merge and an extract. Importing one also takes the loader's lock, so they are
# imported before the load starts, or the main thread would wait for the whole load at its first one.
_COMPILED_MODULES = (
    "_bisect", "_blake2", "_bz2", "_ctypes", "_datetime", "_hashlib", "_heapq", "_json", "_lzma",
    "_opcode", "_posixsubprocess", "_queue", "_random", "_sha512", "_struct", "_typing", "_uuid",
    "fcntl", "math", "mmap", "select", "zlib",
)  # fmt: skip


def _library_folder() -> Path | None:
    """torch's `lib` folder, found without importing torch, or None."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return folder if (folder / "libtorch_cpu.so").is_file() else None


def _open_global_dependencies(folder: Path) -> bool:
    """Open libtorch_global_deps with RTLD_GLOBAL, OpenMP's default team at one while it initializes."""
    path = folder / "libtorch_global_deps.so"
    if not path.is_file():
        return True  # older or unusual builds: libtorch_cpu brings OpenMP itself, below
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    return True


def _libc_dlopen():
    """libc's `dlopen` as a ctypes foreign function, which releases the GIL while it runs (`ctypes.CDLL`
    keeps the GIL through the whole load), or None."""
    return libc.function("dlopen")


def _open(dlopen, path: Path) -> None:
    with trace.span("load torch libraries", path.name):
        dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL)  # NULL on failure: `import torch` reports it


def start() -> bool:
    """Begin loading torch's libraries in the background (Linux, torch not yet imported, once).

    Returns whether a load was started.
    """
    global _helper
    if _helper is not None or "torch" in sys.modules or not sys.platform.startswith("linux"):
        return False
    folder, dlopen = _library_folder(), _libc_dlopen()
    if folder is None or dlopen is None:
        return False
    for name in _COMPILED_MODULES:
        with suppress(ImportError):
            importlib.import_module(name)
    libc.resolve()  # a lookup takes the loader's lock too: the output files' space, their writeback …
    if not _open_global_dependencies(folder):
        return False
    library = folder / "libtorch_cpu.so"
    _helper = threading.Thread(target=_open, args=(dlopen, library), name="loratool-preload", daemon=True)
    _helper.start()
    return True


def finish() -> None:
    """Wait for the load `start` began, if any (before importing torch or changing the environment)."""
    if _helper is not None:
        _helper.join()
