"""Chunks of a quantized weight: runs of whole rows of scale groups, cut into pieces (pure, no I/O).

A chunk is whole rows of scale groups: a row of FP8 blocks, channels, or experts
(a row of FP8 blocks is computed in pieces across its columns). Each chunk's stored
values are contiguous in the file; the LoRA terms restricted to a chunk are
`merging.chunk_terms`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .layout import QuantizedWeight

if TYPE_CHECKING:
    import torch

__all__ = ["CHUNK_ELEMENTS", "Chunk", "chunks", "pieces"]

#: Values per piece: a few 2 MiB fp32 buffers per worker. On the 2-core benchmark machine's 8-layer FP8 merge
#: (interleaved runs, medians of four) the compute took 1.74–1.80 s at 1 << 19, 1.94–2.19 s at 1 << 18, 2.44 s
#: at 1 << 20 and 2.76 s at 1 << 17: fewer, larger torch calls against buffers that stay in the cache.
CHUNK_ELEMENTS = 1 << 19


@dataclass(frozen=True)
class Chunk:
    """Rows [row, row_stop) and, for FP8 block weights, columns [col, col_stop) (else every column)."""

    row: int
    row_stop: int
    col: int = 0
    col_stop: int | None = None

    def within(self, chunk: Chunk) -> Chunk:
        """This piece of `chunk` with its rows counted from the chunk's first (its place in the chunk's buffer)."""
        return Chunk(self.row - chunk.row, self.row_stop - chunk.row, self.col, self.col_stop)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This chunk of a tensor laid out like the weight (its data, or its fp32 values)."""
        rows = tensor[self.row : self.row_stop]
        return rows if self.col_stop is None else rows[:, self.col : self.col_stop]

    def shape(self, weight: QuantizedWeight) -> tuple[int, ...]:
        if self.col_stop is None:
            return (self.row_stop - self.row, *weight.shape[1:])
        return self.row_stop - self.row, self.col_stop - self.col

    def scales(self, weight: QuantizedWeight) -> tuple | slice | None:
        """The index of this chunk's scales in the scale tensor (None: one scale for the tensor)."""
        if weight.scheme == "fp8-tensor":
            return None
        if weight.scheme != "fp8-block":
            return slice(self.row, self.row_stop)
        (height, width), cols = weight.block, self.col_stop or weight.shape[1]
        return slice(self.row // height, -(-self.row_stop // height)), slice(self.col // width, -(-cols // width))


def chunks(weight: QuantizedWeight, whole: bool) -> list[Chunk]:
    """The weight cut into runs of whole rows of scale groups (a row of FP8 blocks, channels, experts) of about
    `CHUNK_ELEMENTS`: each chunk's stored values are contiguous in the file, and written with one `pwrite`."""
    rows, per_row = weight.shape[0], math.prod(weight.shape[1:])
    if whole or not rows:
        return [Chunk(0, rows)]
    step = max(1, CHUNK_ELEMENTS // per_row)
    if weight.scheme == "fp8-block":  # whole rows of blocks
        step = max(1, step // weight.block[0]) * weight.block[0]
    return [Chunk(start, min(rows, start + step)) for start in range(0, rows, step)]


def pieces(weight: QuantizedWeight, chunk: Chunk, whole: bool) -> list[Chunk]:
    """A row of FP8 blocks cut across into runs of whole blocks of about `CHUNK_ELEMENTS` (any other chunk, or a
    `whole` one, in one piece): each piece's few fp32 buffers then stay in the cache between the passes over it."""
    if whole or weight.scheme != "fp8-block" or chunk.row_stop - chunk.row > weight.block[0]:
        return [chunk]  # several rows of blocks fit in one piece
    (height, width), cols = weight.block, weight.shape[1]
    span = min(cols, max(1, CHUNK_ELEMENTS // (height * width)) * width)
    return [Chunk(chunk.row, chunk.row_stop, col, min(cols, col + span)) for col in range(0, cols, span)]
