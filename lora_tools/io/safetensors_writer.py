"""Writing safetensors files: tensors announced up front, then copied, written or computed into place.

Tensor bytes are copied file-to-file without being decoded where they pass
unchanged, written from a buffer, or computed straight into their place in the
file; the header comes first and the file's size is reserved at once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import CorruptFileError
from .safetensors_header import DTYPE_SIZES, TensorInfo
from .storage import naming, pwrite_all, reserve, written_on_exit
from .writeback import Writeback

__all__ = ["SafetensorsWriter", "copy_bytes", "write_tensors", "COPY_CHUNK_BYTES"]

COPY_CHUNK_BYTES = 32 << 20


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

    def copy_from(self, name: str, info: TensorInfo, after_chunk: Callable[[int, int], None] | None = None) -> None:
        """Copy a tensor's bytes straight from its source safetensors file, inside the kernel.

        `after_chunk(start, nbytes)`: called after each `COPY_CHUNK_BYTES` of the tensor are copied (`start`
        counted from the tensor's first byte), while those bytes of the source are still in the page cache,
        so that a reader of them (a check) does not read them from the disk a second time.
        """
        assert info.offset is not None
        _, _, offset, nbytes = self._claim(name, info.nbytes)
        step = max(nbytes, 1) if after_chunk is None else COPY_CHUNK_BYTES  # an empty tensor: nothing to copy
        for start in range(0, nbytes, step):
            count = min(step, nbytes - start)
            with naming(self.path):
                copy_bytes(info.file, info.offset + start, count, self._fd, offset + start)
            if after_chunk is not None:
                after_chunk(start, count)
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
        from .rows import RowSink
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


def write_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> int:
    """Write small CPU tensors as one safetensors file, sorted by name; return its size.

    Unlike `safetensors.torch.save_file`, a full disk is an `OSError` naming `path`.
    """
    from .tensors import tensor_bytes, to_safetensors_dtype

    ordered = sorted(tensors)
    specs = [(name, to_safetensors_dtype(tensors[name].dtype), tuple(tensors[name].shape)) for name in ordered]
    writer = SafetensorsWriter(path, specs, {"format": "pt", **(metadata or {})})
    try:
        for name in ordered:
            writer.write(name, tensor_bytes(tensors[name].detach().cpu()))
    finally:
        writer.close()
    return writer.total_bytes
