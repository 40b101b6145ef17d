"""Writing a computed tensor's rows into its place in the output file, block by block, with pwrite.

Writing through a shared mapping costs a page fault per 4 KiB page, and on ext4 a
journal handle in each fault (`page_mkwrite`): measured here, that was more system
time than the copy itself. `pwrite` of a rounded block from a small reused buffer
copies it into the page cache in one call, with no faults, and each byte of a
changed tensor is written once (the base bytes are read through a read-only mapping,
which the kernel maps many pages per fault).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from .storage import pwrite_all
from .tensors import mapped_tensor, tensor_bytes, to_safetensors_dtype

__all__ = ["RowSink"]


class RowSink:
    """The place of one tensor in an open output file, written a block of rows at a time.

    `dtype` and `shape` are the stored tensor's; `write(first_row, rows)` takes rows already
    rounded to `dtype`, each row flattened or not (a conv weight's rows are its output channels). `written()` maps the finished tensor back (read-only), e.g. to word
    an error about its values.
    """

    def __init__(self, fd: int, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.fd, self.path, self.offset = fd, path, offset
        self.dtype, self.shape = dtype, torch.Size(shape)
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def write(self, first_row: int, rows: torch.Tensor) -> None:
        count = rows.shape[0] if rows.dim() else 0
        fits = rows.dtype == self.dtype and rows.numel() * self.dtype.itemsize == count * self.row_bytes
        if not (rows.is_contiguous() and fits):
            raise AssertionError(f"{self.path}: rows of {rows.dtype} {tuple(rows.shape)} do not fit {self.shape}")
        self.write_bytes(first_row, tensor_bytes(rows))

    def write_bytes(self, first_row: int, data: memoryview) -> None:
        """Write whole rows, given as their bytes (a flat byte view, e.g. `tensor_bytes` of rounded rows)."""
        count, partial = divmod(len(data), self.row_bytes) if self.row_bytes else (0, len(data))
        if partial:
            raise AssertionError(f"{self.path}: {len(data)} bytes are not whole rows of {tuple(self.shape)}")
        if first_row < 0 or first_row + count > self.shape[0]:
            raise AssertionError(f"{self.path}: rows {first_row}…{first_row + count} outside {tuple(self.shape)}")
        pwrite_all(self.fd, data, self.offset + first_row * self.row_bytes, self.path)

    def written(self) -> AbstractContextManager[torch.Tensor]:
        return mapped_tensor(self.path, self.offset, to_safetensors_dtype(self.dtype), tuple(self.shape))
