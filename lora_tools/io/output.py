"""Writing outputs safely: temporary siblings, atomic renames, free-space checks.

An output folder or file appears at its final path only once it is complete.
A run that fails or is interrupted removes its temporary sibling; one killed
outright leaves `.NAME.loratool-tmp-PID`, which the next run for NAME removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..errors import DiskSpaceError, OutputExistsError, OutputNameError
from .output_guard import output_lock, refuse_touching_inputs, rename_no_replace
from .storage import named_as_output

__all__ = ["atomic_output", "check_output_path", "checksums", "TEMP_MARKER"]

TEMP_MARKER = ".loratool-tmp-"


def check_output_path(output: Path, inputs: Sequence[Path], *, force: bool) -> None:
    """Refuse an output that exists (without `force`), or that is, holds, or sits inside an input."""
    refuse_touching_inputs(output, inputs)
    if (output.exists() or output.is_symlink()) and not force:
        raise OutputExistsError(f"output {output} already exists; pass --force to replace it")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):  # unlinking a missing name on a read-only filesystem fails with EROFS
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output: Path) -> list[Path]:
    """Delete what killed runs for the same output left behind; return what was removed."""
    removed = []
    for path in output.parent.glob(f".{output.name}{TEMP_MARKER}*"):
        suffix = path.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            _remove(path)
            removed.append(path)
    return removed


def _one_run_at_a_time(open_output):
    """Run `atomic_output` holding OUT's lock; refuse a folder named like a weights file."""

    @contextmanager
    def locked(output: Path, *, is_dir: bool, force: bool, inputs: Sequence[Path], **options) -> Iterator[Path]:
        output = Path(output)
        if is_dir and output.suffix in _FILE_SUFFIXES:
            raise OutputNameError(f"output {output} names a file, but this writes a folder; drop the {output.suffix}")
        check_output_path(output, inputs, force=force)
        output.parent.mkdir(parents=True, exist_ok=True)
        with output_lock(output), open_output(output, is_dir=is_dir, force=force, inputs=inputs, **options) as target:
            yield target

    return locked


_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json")


def _put_in_place(temporary: Path, output: Path, *, force: bool, inputs: Sequence[Path]) -> None:
    """The final rename: inputs checked again; without `force` never over something that appeared meanwhile."""
    try:
        refuse_touching_inputs(output, inputs)
        if not force:
            try:
                rename_no_replace(temporary, output)
            except FileExistsError:
                raise OutputExistsError(
                    f"output {output} appeared while this run was writing it; it was left as it is and this "
                    "run's result discarded (pass --force to replace it)"
                ) from None
            return
    except BaseException:
        _remove(temporary)
        raise
    old = output.parent / f".{output.name}.loratool-old-{os.getpid()}"
    if output.is_symlink():
        output.unlink()
    elif output.exists():
        os.replace(output, old)
    os.replace(temporary, output)
    _remove(old)


@_one_run_at_a_time
@contextmanager
def atomic_output(
    output: Path, *, is_dir: bool, force: bool, inputs: Sequence[Path], estimated_bytes: int = 0
) -> Iterator[Path]:
    """Yield a temporary sibling of `output` to write into; rename it into place on success.

    The whole run holds OUT's lock (see `output_guard`); the checks run again under it.

    Raises:
        OutputExistsError: see `check_output_path`; another run writes OUT; OUT appeared meanwhile.
        OutputNameError: a folder output named like a file (`out.safetensors`).
        DiskSpaceError: fewer free bytes than `estimated_bytes` where the output goes.
    """
    output = Path(output)
    check_output_path(output, inputs, force=force)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    free = shutil.disk_usage(output.parent).free
    if estimated_bytes > free:
        raise DiskSpaceError(
            f"{output.parent}: the output needs about {estimated_bytes:,} bytes but only {free:,} are free"
        )
    temporary = output.parent / f".{output.name}{TEMP_MARKER}{os.getpid()}"
    _remove(temporary)
    try:
        with named_as_output(temporary, output):
            if is_dir:
                temporary.mkdir()
            yield temporary
    except BaseException:
        _remove(temporary)
        raise
    _put_in_place(temporary, output, force=force, inputs=inputs)


def checksums(path: Path) -> dict[str, str]:
    """sha256 of every file of an output (a folder's files by relative path, or a lone file by name)."""
    import hashlib

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digests = {}
    for file in files:
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digests[str(file.relative_to(path)) if path.is_dir() else path.name] = digest.hexdigest()
    return digests
