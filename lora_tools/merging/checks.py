"""NaN and Inf, refused before they reach an output: in the adapters, and in base tensors copied unchanged."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from .. import trace
from ..adapters.model import Adapter
from ..errors import NonFiniteError

__all__ = ["CopyChecks", "check_adapters_finite", "all_finite"]


class CopyChecks:
    """The NaN/Inf check of the base tensors copied unchanged, made chunk by chunk as they are copied.

    Each chunk is checked on the copying thread just after it is copied, while its bytes are
    still in the page cache: a check made after all the copies would read them from the disk
    a second time (in a memory-limited cgroup, the page cache cannot hold them). Copies start
    before torch is imported; the chunks copied until then wait in `pending` and are checked
    first once torch is `ready` (the latest first: the likeliest still cached), the rest by
    `finish`, queued after the copies.
    """

    def __init__(self, wanted: bool) -> None:
        self.wanted = wanted
        self.ready = threading.Event()
        self.pending: list[tuple[object, int, int]] = []  # (info, start, nbytes), touched by the copier only

    def after_chunk(self, info):
        """The `after_chunk` callback of a copy of `info`'s bytes, or None when nothing is to be checked."""
        if not (self.wanted and info.is_float):
            return None
        return lambda start, nbytes: self._chunk(info, start, nbytes)

    def _chunk(self, info, start: int, nbytes: int) -> None:
        if not self.ready.is_set():
            self.pending.append((info, start, nbytes))
            return
        self._drain()
        _refuse_nonfinite(info, start, nbytes)

    def finish(self) -> None:
        """Check what was copied before torch was ready (on the copier, after every copy)."""
        self.ready.wait()
        self._drain()

    def _drain(self) -> None:
        if not self.pending:
            return
        from ..compute.pool import one_torch_thread

        one_torch_thread()
        with trace.span("nonfinite check", f"{len(self.pending)} chunks copied before torch"):
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
