"""NaN and Inf, refused before they reach an output: in the adapters, and in base tensors copied unchanged."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from .. import trace
from ..adapters.model import Adapter
from ..errors import NonFiniteError

__all__ = ["CopyChecks", "check_adapters_finite", "all_finite", "BACKLOG_BYTES"]

#: Bytes of copied tensors that may wait for their check while torch is being imported: measured on a cold
#: 8 GB merge in a 2 GiB cgroup, 256 MiB held the copies back for too long (+10–25% wall time), 1 GiB cost
#: nothing, and bounds what a slow import (2.9 s once) leaves to be read again.
BACKLOG_BYTES = 1 << 30


class CopyChecks:
    """The NaN/Inf check of the base tensors copied unchanged, made chunk by chunk as they are copied.

    Each chunk is checked on the copying thread just after it is copied, while its bytes are
    still in the page cache: a check made after all the copies would read them from the disk
    a second time (in a memory-limited cgroup, the page cache cannot hold them). Copies start
    before torch is imported; the chunks copied until then wait in `pending`, at most
    `backlog` bytes of them: the copier then waits for torch to be `ready` (a cold import of
    torch, reading its own files, can take longer than copying every untouched tensor). The
    waiting chunks are checked first once it is (the latest first: the likeliest still
    cached), any left by `finish`, queued after the copies. `abandon` (the run stops before
    torch is ready) releases a copier that waits.
    """

    def __init__(self, wanted: bool, backlog: int = BACKLOG_BYTES) -> None:
        self.wanted, self.backlog = wanted, backlog
        self.ready = threading.Event()
        self.abandoned = False
        self.pending: list[tuple[object, int, int]] = []  # (info, start, nbytes), touched by the copier only
        self.pending_bytes = 0

    def after_chunk(self, info):
        """The `after_chunk` callback of a copy of `info`'s bytes, or None when nothing is to be checked."""
        if not (self.wanted and info.is_float):
            return None
        return lambda start, nbytes: self._chunk(info, start, nbytes)

    def _chunk(self, info, start: int, nbytes: int) -> None:
        self.pending.append((info, start, nbytes))
        if not self.ready.is_set():
            self.pending_bytes += nbytes
            if self.pending_bytes < self.backlog:
                return
            with trace.span("copies wait for torch", f"{self.pending_bytes >> 20} MiB to check"):
                self.ready.wait()
        self._drain()

    def abandon(self) -> None:
        """The run stops: a copier waiting for torch goes on (and checks nothing more)."""
        self.abandoned = True
        self.ready.set()

    def finish(self) -> None:
        """Check what was copied before torch was ready (on the copier, after every copy)."""
        self.ready.wait()
        self._drain()

    def _drain(self) -> None:
        if not self.pending or self.abandoned:
            return
        from ..compute.pool import one_torch_thread

        one_torch_thread()
        with trace.span("nonfinite check", f"{len(self.pending)} chunks"):
            while self.pending:
                _refuse_nonfinite(*self.pending.pop())


def _refuse_nonfinite(info, start: int, nbytes: int) -> None:
    """Refuse a base tensor holding NaN/Inf in bytes `start` to `start + nbytes`: copied untouched, it would
    reach the output. The message counts the whole tensor's."""
    from ..io.safetensors_header import DTYPE_SIZES

    itemsize = DTYPE_SIZES[info.dtype]
    if not _count_nonfinite(info, start // itemsize, nbytes // itemsize):
        return
    bad = _count_nonfinite(info, 0, info.numel)
    if bad:
        raise NonFiniteError(
            f"{info.file}: base tensor {info.name!r} holds {bad} NaN/Inf value(s), which would reach the output "
            "(pass --allow-nonfinite if the model really contains them)"
        )


_CHECK_CHUNK_BYTES = 16 << 20


def _count_nonfinite(info, first: int, numel: int) -> int:
    """NaN/Inf values among elements `first` to `first + numel` of a stored tensor, read through small
    mappings (min/max first, which NaN and Inf reach)."""
    import torch

    from ..io.safetensors_header import DTYPE_SIZES
    from ..io.tensors import mapped_tensor

    itemsize = DTYPE_SIZES[info.dtype]
    step = _CHECK_CHUNK_BYTES // itemsize
    bad = 0
    for start in range(first, first + numel, step):
        count = min(step, first + numel - start)
        with mapped_tensor(info.file, info.offset + start * itemsize, info.dtype, (count,)) as chunk:
            if not all_finite(chunk):
                bad += int((~torch.isfinite(chunk)).sum())
    return bad


def check_adapters_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters holding NaN or Inf before any output is written."""
    for adapter in adapters:
        for key, info in adapter.tensors.items():
            if info.is_float and not all_finite(adapter.read(key)):
                raise NonFiniteError(f"{adapter.path}: adapter tensor {key!r} holds NaN or Inf; the adapter is broken")


def all_finite(values) -> bool:
    """Whether a float tensor holds no NaN or Inf, from one min/max pass (both reach the extremes; NaN
    propagates), without the element-wise mask `isfinite` would write; dtypes without min/max use that."""
    import torch

    from ..compute.extremes import extremes

    if values.numel() == 0:
        return True
    try:
        low, high = extremes(values)
    except (RuntimeError, NotImplementedError):  # e.g. float8
        return bool(torch.isfinite(values).all())
    return math.isfinite(float(low)) and math.isfinite(float(high))
