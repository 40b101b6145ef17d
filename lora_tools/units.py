"""Byte sizes as people write them ("500MB", "5GB", "10GiB") and back; the progress callback's shape."""

from __future__ import annotations

import re
from collections.abc import Callable

from .errors import InvalidInputError

__all__ = ["parse_size", "format_bytes", "Progress"]

#: A progress callback, called with (done, total): bytes for merges, module elements for the rest.
Progress = Callable[[int, int], None]

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip


def parse_size(value: int | str) -> int:
    """Parse "5GB" (decimal, as transformers does) or "10GiB" (binary) into bytes."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidInputError(f"size {value!r} is not understood (examples: 500MB, 5GB, 10GiB)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InvalidInputError(f"size {value!r} must be positive")
    return size


def format_bytes(count: int) -> str:
    """1234567 → "1.2 MB"."""
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
