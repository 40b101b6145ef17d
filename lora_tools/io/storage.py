"""Output files on real disks: space reserved before writing, and the file named in OS errors.

A file that is sized with `ftruncate` and then written through a memory map
has no blocks behind it: when the filesystem cannot allocate a page during a
mapped write (the disk filled up meanwhile), the kernel kills the process
with SIGBUS, leaving no message and the temporary output behind. So every
output file's full size is allocated when it is created (`reserve`), where a
shortage is a plain `ENOSPC` error. On filesystems that cannot reserve space
(no `fallocate`: some network or copy-on-write filesystems) the blocks are
filled with zeros instead, which does not promise the space is still there
when the data is rewritten, and tensors are then written with `pwrite` from
memory (`written_on_exit`), never through a mapping, so a full disk is again
an error and not a signal.

OS errors raised while writing often carry no file name (`pwrite` on a file
descriptor); `naming` adds it, and `errors.os_error_problem` turns the error
into one sentence and exit 4.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import libc

__all__ = ["reserve", "naming", "give_name", "pwrite_all", "named_as_output", "written_on_exit"]

log = logging.getLogger(__name__)

#: errno values that mean "this filesystem cannot allocate ahead", not "no space".
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})
_ZERO_CHUNK = 8 << 20


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an `OSError` raised inside the block `path` as its file name, when it names none."""
    try:
        yield
    except OSError as exc:
        give_name(exc, path)
        raise


def give_name(exc: OSError, path: str | os.PathLike) -> None:
    """`naming` for one error, where a context manager would cost too much (a loop's every call)."""
    from ..errors import LoraToolError

    if exc.filename is None and not isinstance(exc, LoraToolError):
        exc.filename = str(path)


def pwrite_all(fd: int, data: memoryview | bytes, offset: int, path: str | os.PathLike | None) -> None:
    """Write all of `data` at `offset` (`pwrite` may write less than asked); an OSError names `path`
    (None: left to the caller's `naming`)."""
    view = memoryview(data).cast("B")
    try:
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done
    except OSError as exc:
        if path is not None:
            give_name(exc, path)
        raise


@contextmanager
def named_as_output(temporary: Path, output: Path) -> Iterator[None]:
    """OS errors inside the block name `output` (or the file under it), not its temporary sibling.

    The user asked for `output`; `.NAME.loratool-tmp-PID` is gone by the time they read the message.
    """
    from ..errors import LoraToolError

    try:
        yield
    except OSError as exc:
        if not isinstance(exc, LoraToolError) and exc.errno is not None:  # an OS error, not a message of ours
            exc.filename = _as_output(exc.filename, temporary, output) if exc.filename is not None else str(output)
            exc.filename2 = _as_output(exc.filename2, temporary, output)
        raise


def _as_output(name, temporary: Path, output: Path):
    """`temporary/x` becomes `output/x`; a scratch sibling named after `temporary` becomes `output`."""
    if name is None:
        return None
    text = os.fsdecode(name)
    if text.startswith(str(temporary)):
        return str(output) + text[len(str(temporary)) :]
    if Path(text).parent == temporary.parent and temporary.name in Path(text).name:
        return str(output)
    return name


def _linux_fallocate():
    """libc's `fallocate(2)` wrapper, which (unlike `posix_fallocate`) never falls back to writing zeros itself."""
    return libc.function("fallocate64") or libc.function("fallocate")


def _allocate(fd: int, size: int) -> None:
    """Allocate `size` bytes from offset 0 without writing them; OSError(EOPNOTSUPP) where impossible."""
    fallocate = _linux_fallocate()
    if fallocate is not None:
        import ctypes

        while fallocate(fd, 0, 0, size) != 0:
            code = ctypes.get_errno()
            if code != errno.EINTR:  # a signal: its Python handler runs here, then the call is retried
                raise OSError(code, os.strerror(code))
    elif hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def _write_zeros(fd: int, start: int, size: int) -> None:
    zeros = bytes(min(_ZERO_CHUNK, max(size - start, 0)))
    offset = start
    while offset < size:
        offset += os.pwrite(fd, memoryview(zeros)[: size - offset], offset)


def reserve(fd: int, size: int, path: str | os.PathLike) -> bool:
    """Allocate the blocks of `fd`'s first `size` bytes (the file grows to `size`), keeping what it holds.

    Returns:
        True when the filesystem reserved the space (mapped writes cannot then
        fault for lack of it); False when zeros were written instead, which
        copy-on-write filesystems do not hold for a later rewrite.

    Raises:
        OSError: ENOSPC, EDQUOT, EFBIG … with `path` as its file name.
    """
    with naming(path):
        if size == 0:
            return True
        try:
            _allocate(fd, size)
            log.debug("%s: reserved %d bytes with fallocate", path, size)
            return True
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
        start = os.fstat(fd).st_size
        log.debug("%s: this filesystem cannot reserve space; writing %d bytes of zeros instead", path, size - start)
        _write_zeros(fd, start, size)
        return False


@contextmanager
def written_on_exit(fd: int, path: Path, offset: int, dtype: str, shape: tuple[int, ...]):
    """A CPU tensor in memory whose bytes are written to `fd` at `offset` when the block ends without error.

    Stands in for a mapped view of the file where a mapped write could fault.
    """
    import torch

    from .tensors import TORCH_DTYPES, tensor_bytes

    tensor = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
    yield tensor
    pwrite_all(fd, tensor_bytes(tensor), offset, path)
