"""The safetensors header, read without trusting it: what each tensor is and where its bytes lie.

The header is parsed and checked here (lengths, offsets, dtypes, duplicate
names) so that a hostile file becomes a `CorruptFileError` naming the entry,
never a crash deeper down. Nothing here reads tensor data or imports torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError

__all__ = ["DTYPE_SIZES", "FLOAT_DTYPES", "TensorInfo", "read_header"]

MAX_HEADER_BYTES = 100_000_000


#: Bytes per element for every dtype the safetensors format defines.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from headers alone.

    `offset` is absolute within `file` for safetensors; `None` for tensors that
    live in a pickle (they are reached through torch.load instead).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise CorruptFileError(path, f"header names tensor {key!r} twice")
            seen[key] = value
        return seen

    return hook


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header.

    Returns:
        The tensors in file order, and the `__metadata__` strings.

    Raises:
        CorruptFileError: naming the file and the offending entry.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptFileError(path, f"file is {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CorruptFileError(path, f"header length {header_len} exceeds the 100 MB limit")
            if 8 + header_len > size:
                raise CorruptFileError(
                    path, f"header length {header_len} runs past the end of the {size}-byte file (truncated?)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CorruptFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(path, f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(path, f"header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError(path, "__metadata__ must map strings to strings")

    data_start = 8 + header_len
    data_len = size - data_start
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        info, begin, end = _parse_entry(path, name, entry)
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, info[0], info[1], path, data_start + begin)

    cursor = 0
    for begin, end, name in sorted(spans):
        if begin < cursor:
            raise CorruptFileError(path, f"tensor {name!r} overlaps the previous tensor (offset {begin} < {cursor})")
        if begin > cursor:
            raise CorruptFileError(path, f"gap of {begin - cursor} bytes before tensor {name!r}")
        cursor = end
    if cursor > data_len:
        raise CorruptFileError(
            path, f"tensor data runs to byte {cursor} but the file holds {data_len} data bytes (truncated?)"
        )
    if cursor < data_len:
        raise CorruptFileError(path, f"{data_len - cursor} unexpected bytes after the last tensor")
    ordered = dict(sorted(tensors.items(), key=lambda item: item[1].offset or 0))
    return ordered, dict(metadata)


def _parse_entry(path: Path, name: str, entry: object) -> tuple[tuple[str, tuple[int, ...]], int, int]:
    if not isinstance(entry, dict):
        raise CorruptFileError(path, f"entry for tensor {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptFileError(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptFileError(path, f"tensor {name!r} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptFileError(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CorruptFileError(
            path,
            f"tensor {name!r}: {dtype} × {shape} needs {expected} bytes but its offsets span {offsets[1] - offsets[0]}",
        )
    return (dtype, tuple(shape)), offsets[0], offsets[1]
