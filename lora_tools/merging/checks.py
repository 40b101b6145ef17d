"""NaN and Inf, refused before they reach an output: in the adapters, and in base tensors copied unchanged."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .. import trace
from ..adapters.model import Adapter
from ..errors import NonFiniteError

__all__ = ["checked_alone", "check_adapters_finite", "all_finite"]


def checked_alone(info) -> None:
    """`_refuse_nonfinite` on a helper thread, with one torch thread and the lowest priority (the compute
    has the cores)."""
    from ..compute.pool import one_torch_thread, yield_to_compute

    one_torch_thread()
    yield_to_compute()
    with trace.span("nonfinite check", info.name):
        _refuse_nonfinite(info)


def _refuse_nonfinite(info) -> None:
    """Refuse a base tensor holding NaN/Inf: copied untouched, it would reach the output."""
    bad = _count_nonfinite(info) if info.is_float else 0
    if bad:
        raise NonFiniteError(
            f"{info.file}: base tensor {info.name!r} holds {bad} NaN/Inf value(s), which would reach the output "
            "(pass --allow-nonfinite if the model really contains them)"
        )


_CHECK_CHUNK_BYTES = 16 << 20


def _count_nonfinite(info) -> int:
    """NaN/Inf values in a stored tensor, read through small mappings (min/max first, which NaN and Inf reach)."""
    import torch

    from ..io.safetensors_header import DTYPE_SIZES
    from ..io.tensors import mapped_tensor

    itemsize = DTYPE_SIZES[info.dtype]
    step = _CHECK_CHUNK_BYTES // itemsize
    bad = 0
    for start in range(0, info.numel, step):
        count = min(step, info.numel - start)
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

    if values.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(values)
    except (RuntimeError, NotImplementedError):  # e.g. float8
        return bool(torch.isfinite(values).all())
    return math.isfinite(float(low)) and math.isfinite(float(high))
