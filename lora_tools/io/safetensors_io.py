"""Reading and writing the safetensors container without trusting it.

The header is parsed and checked here (lengths, offsets, dtypes, duplicate
names) so that a hostile file becomes a `CorruptFileError` naming the entry,
never a crash deeper down. Tensor bytes are then read one tensor at a time, or
copied file-to-file without being decoded at all.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFileError
from .storage import naming, pwrite_all, reserve, written_on_exit
from .writeback import Writeback

__all__ = ["DTYPE_SIZES", "TensorInfo", "read_header", "SafetensorsWriter", "copy_bytes"]

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


def copy_bytes(src: Path, offset: int, count: int, dst_fd: int, dst_offset: int) -> None:
    """Copy `count` bytes of `src` from `offset` to `dst_fd` at `dst_offset`, in the kernel where possible."""
    with open(src, "rb") as f:
        src_fd = f.fileno()
        remaining = count
        while remaining:
            try:
                done = os.copy_file_range(src_fd, dst_fd, remaining, offset, dst_offset)
            except (AttributeError, OSError):
                done = 0
            if done == 0:
                break
            offset, dst_offset, remaining = offset + done, dst_offset + done, remaining - done
        while remaining:
            chunk = os.pread(src_fd, min(remaining, 64 << 20), offset)
            if not chunk:
                raise CorruptFileError(src, f"ended {remaining} bytes early while copying tensor data")
            pwrite_all(dst_fd, chunk, dst_offset, None)  # the caller names the file
            offset, dst_offset, remaining = offset + len(chunk), dst_offset + len(chunk), remaining - len(chunk)


class SafetensorsWriter:
    """Write one safetensors file whose tensors are announced up front.

    The header is written and the file's full size reserved at once (see
    `storage.reserve`: a full disk fails here, cleanly), so each tensor has a fixed
    place: tensors can then be written in any order, by copying bytes from a
    source file, writing a buffer, or computing straight into a mapped view
    (`mapped`). Memory never holds more than the tensor being produced.
    `close()` checks that every announced tensor arrived.
    """

    def __init__(
        self, path: Path, specs: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None
    ) -> None:
        self.path = path
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        spans: list[tuple[str, str, tuple[int, ...], int, int]] = []
        offset = 0
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            spans.append((name, dtype, tuple(shape), offset, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        data_start = 8 + len(encoded)
        self.total_bytes = data_start + offset
        self._places = {name: (dtype, shape, data_start + begin, nbytes) for name, dtype, shape, begin, nbytes in spans}
        self._missing = set(self._places)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with naming(path):
                os.pwrite(self._fd, struct.pack("<Q", len(encoded)) + encoded, 0)
            self.reserved = reserve(self._fd, self.total_bytes, path)  # a full disk fails here, not in a mapped write
        except BaseException:
            os.close(self._fd)
            raise
        self._writeback = Writeback(self._fd, self.total_bytes)

    def _claim(self, name: str, nbytes: int | None = None) -> tuple[str, tuple[int, ...], int, int]:
        dtype, shape, offset, expected = self._places[name]
        if name not in self._missing or (nbytes is not None and nbytes != expected):
            raise AssertionError(f"{self.path}: tensor {name} written twice or with {nbytes} bytes, not {expected}")
        self._missing.discard(name)
        return dtype, shape, offset, expected

    def write(self, name: str, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        _, _, offset, _ = self._claim(name, len(view))
        pwrite_all(self._fd, view, offset, self.path)

    def copy_from(self, name: str, info: TensorInfo) -> None:
        """Copy a tensor's bytes straight from its source safetensors file, inside the kernel."""
        assert info.offset is not None
        _, _, offset, nbytes = self._claim(name, info.nbytes)
        with naming(self.path):
            copy_bytes(info.file, info.offset, nbytes, self._fd, offset)
        self._writeback.finished(offset, nbytes)

    def mapped(self, name: str):
        """A context manager yielding a writable CPU tensor that is the tensor's place in the file.

        Where the filesystem could not reserve the file's space, the tensor is in memory and written
        with `pwrite` at the end instead: a mapped write there could meet a full disk, which the
        kernel answers with SIGBUS.
        """
        from .tensors import mapped_tensor

        dtype, shape, offset, _ = self._claim(name)
        if not self.reserved:
            return written_on_exit(self._fd, self.path, offset, dtype, shape)
        return mapped_tensor(self.path, offset, dtype, shape, writable=True)

    def rows(self, name: str):
        """A `RowSink` that writes the tensor's rows with `pwrite` (no mapping, so no page faults);
        call `written(name)` once every row is in."""
        from ..compute.sink import RowSink
        from .tensors import to_torch_dtype

        dtype, shape, offset, _ = self._claim(name)
        return RowSink(self._fd, self.path, offset, to_torch_dtype(dtype), shape)

    def written(self, name: str) -> None:
        """The tensor's bytes are final: let the writeback pacing (large files only) send them to disk."""
        _, _, offset, nbytes = self._places[name]
        self._writeback.finished(offset, nbytes)

    def close(self) -> None:
        try:
            if self._missing:
                raise AssertionError(f"{self.path}: {len(self._missing)} tensors were never written")
        finally:
            os.close(self._fd)
