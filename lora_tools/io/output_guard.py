"""Guards around an output path: it never touches an input, one run writes it at a time, nothing is replaced unasked.

- Inputs are judged by the files really read: every file of an input folder is resolved through its
  symlinks, so OUT is refused when it is, holds, or sits inside any of them or the folders they
  really live in (an HF cache snapshot's files live in `../../blobs/`).
- A run holds an exclusive `flock` on `.NAME.loratool-lock` beside OUT from before its checks until
  after its final rename. The kernel drops the lock when the process dies, so a `kill -9` never
  blocks the next run; the holder deletes the file before letting go, and a run that locked a file
  already deleted tries again, so two runs never both hold the lock. A killed run leaves the file
  behind (empty, unlocked); the next run for the same OUT takes it over and deletes it.
- Without --force the final rename is no-replace (`renameat2(RENAME_NOREPLACE)` on Linux,
  `renamex_np(RENAME_EXCL)` on macOS, else a check under the lock): an OUT that something else
  created meanwhile is kept and the run fails.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError
from .storage import named_as_output

__all__ = ["output_lock", "rename_no_replace", "refuse_touching_inputs", "files_read", "LOCK_SUFFIX"]

LOCK_SUFFIX = ".loratool-lock"
_MAX_DEPTH = 4


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _walk(folder: Path, depth: int, seen: set[str]) -> Iterator[Path]:
    """Files under `folder` (following symlinked folders once each, a few levels deep)."""
    real = os.path.realpath(folder)
    if real in seen or depth > _MAX_DEPTH:
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):  # .git, .cache: never read by loratool
            continue
        if path.is_dir():
            yield from _walk(path, depth + 1, seen)
        elif path.is_file():
            yield path


def files_read(inputs: Sequence[str | os.PathLike]) -> tuple[dict[Path, str], set[Path]]:
    """The real paths of every file the inputs may read, and the real folders to keep OUT out of.

    Returns:
        (files, folders): `files` maps each real file path to the input it is read through; `folders` holds each input folder and, for input folders, the real folder
        of each of its files; a lone input file adds its own real path only (OUT may sit beside it).
    """
    files: dict[Path, str] = {}
    folders: set[Path] = set()
    for given in inputs:
        source = Path(given)
        if source.is_file() and source.name.endswith(".index.json"):
            source = source.parent  # an index is read with its shards: guard the whole folder
        if source.is_dir():
            folders.add(Path(os.path.realpath(source)))
            for file in _walk(source, 0, set()):
                real = Path(os.path.realpath(file))
                files.setdefault(real, str(given))
                folders.add(real.parent)
        elif source.exists():
            files.setdefault(Path(os.path.realpath(source)), str(given))
    return files, folders


def refuse_touching_inputs(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an OUT that resolves to, holds, or sits inside a file that is read, or a folder it really lives in.

    Raises:
        OutputExistsError: naming the input and its real location (exit 3).
    """
    out = Path(os.path.realpath(output))
    files, folders = files_read(inputs)
    for file, given in sorted(files.items()):
        if _within(file, out):
            raise OutputExistsError(
                f"output {output} would overwrite or hold {file}, which input {given} reads; choose another --output"
            )
    for folder in sorted(folders):
        if _within(out, folder) or _within(folder, out):
            raise OutputExistsError(
                f"output {output} would overwrite or sit inside input folder {folder}; choose another --output"
            )


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `.NAME.loratool-lock` beside `output` exclusively for the duration, or refuse at once.

    Raises:
        OutputExistsError: another run holds the lock (exit 3).
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform: the no-replace rename still protects OUT
        yield
        return
    path = output.parent / f".{output.name}{LOCK_SUFFIX}"
    while True:
        with named_as_output(path, output):  # a read-only or full folder is reported as OUT's problem
            handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise OutputExistsError(
                f"another loratool run is writing {output} right now (it holds {path}); "
                "wait for it to finish or choose another --output"
            ) from None
        if _same_file(path, handle):
            break
        os.close(handle)  # locked a lock file its holder had already deleted: take the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)


def _same_file(path: Path, handle: int) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _native_no_replace():
    """A function(source, target) -> errno (0 on success), or None where the OS has no such rename."""
    import ctypes
    import sys

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        call = libc.renameat2
        call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_fdcwd, rename_noreplace = -100, 1
        run = lambda a, b: call(at_fdcwd, a, at_fdcwd, b, rename_noreplace)  # noqa: E731
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        call = libc.renamex_np
        call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rename_excl = 0x4
        run = lambda a, b: call(a, b, rename_excl)  # noqa: E731
    else:
        return None

    def rename(source: str, target: str) -> int:
        return 0 if run(os.fsencode(source), os.fsencode(target)) == 0 else ctypes.get_errno()

    return rename


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists (call it with the output lock held).

    Raises:
        FileExistsError: `target` exists; nothing was renamed.
    """
    native = _native_no_replace()
    if native is not None:
        code = native(str(source), str(target))
        if code == 0:
            return
        if code == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):  # the filesystem cannot rename without replacing: check under the lock
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)
