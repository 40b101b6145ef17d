"""`diff`: two checkpoints compared tensor by tensor (bytes, ulps, and the rank of each change)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..analysis.diff import DiffReport, tensor_diff
from ..io.checkpoint import open_checkpoint
from ..io.hub import resolve_input

__all__ = ["diff"]


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike,
    *,
    spectrum: bool = True,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor (folders, files or Hub repo ids).

    Args:
        spectrum: compute the rank holding 90/99 % of each changed 2-D tensor's change
            (exact SVD for small tensors, a seeded randomized prefix for large ones).

    Raises:
        InvalidInputError: either side cannot be opened.
    """
    started = time.perf_counter()
    first = open_checkpoint(resolve_input(a, revision=revision, token=token)[0])
    second = open_checkpoint(resolve_input(b, revision=revision, token=token)[0])
    shared = [n for n in first.tensors if n in second.tensors]
    tensors = []
    for number, name in enumerate(shared, 1):
        tensors.append(tensor_diff(name, first, second, spectrum))
        if progress is not None:
            progress(number, len(shared))
    return DiffReport(
        a=str(a),
        b=str(b),
        tensors=tensors,
        only_in_a=[n for n in first.tensors if n not in second.tensors],
        only_in_b=[n for n in second.tensors if n not in first.tensors],
        seconds=time.perf_counter() - started,
    )
