"""Chunks of a quantized weight, and the LoRA terms restricted to one chunk (pure torch, no I/O).

A chunk is whole rows of scale groups: a row of FP8 blocks, channels, or experts
(a row of FP8 blocks is computed in pieces across its columns). A plain LoRA's ΔW
on a chunk is B[rows]·A[:, cols]; an expert LoRA's on a run of experts is built
from their rows of A and columns of B. `merge_lora` adds the terms in the order
and with the roundings of `ops.compute_task`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..plan import TensorTask
from .layout import QuantizedWeight

__all__ = ["CHUNK_ELEMENTS", "Chunk", "chunks", "pieces", "row_local", "window", "lora_pairs", "merge_lora"]

#: Values per piece: a few 2 MiB fp32 buffers per worker. On the 2-core benchmark machine's 8-layer FP8 merge
#: (interleaved runs, medians of four) the compute took 1.74–1.80 s at 1 << 19, 1.94–2.19 s at 1 << 18, 2.44 s
#: at 1 << 20 and 2.76 s at 1 << 17: fewer, larger torch calls against buffers that stay in the cache.
CHUNK_ELEMENTS = 1 << 19
Fetch = Callable[[int, str], torch.Tensor]


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


def row_local(task: TensorTask) -> bool:
    """Whether a chunk of ΔW comes from slices of the factors alone (plain LoRA and expert terms)."""
    return not task.replacements and all(
        not t.bias and not t.module.dora and t.piece is None and t.module.kind == "linear"
        and t.module.variant in ("lora", "experts")
        for t in task.terms
    )  # fmt: skip


def window(task: TensorTask, factors: dict, chunk: Chunk) -> Fetch:
    """A fetch giving each term's factors restricted to the chunk: ΔW[rows, cols] = B[rows] · A[:, cols]."""
    rows, cols = slice(chunk.row, chunk.row_stop), slice(chunk.col, chunk.col_stop)
    windows = {}
    for term in task.terms:
        module, a_key, b_key = term.module, (term.adapter, term.module.a_key), (term.adapter, term.module.b_key)
        a, b = factors[a_key], factors[b_key]
        if module.variant == "experts":  # A [E·r, in] by expert; B [out, E·r] with the expert index fastest
            experts = task.shape[0]
            windows[a_key] = a[chunk.row * module.rank : chunk.row_stop * module.rank]
            windows[b_key] = b.unflatten(1, (-1, experts))[:, :, rows].flatten(1)
        elif module.fan_in_fan_out:  # ΔW = (B·A)ᵀ: its rows are columns of A, its columns rows of B
            windows[a_key], windows[b_key] = a[:, rows], b[cols]
        else:
            windows[a_key], windows[b_key] = a[:, cols], b[rows]
    return lambda index, key: windows[index, key]


def lora_pairs(task: TensorTask, factors: dict) -> list | None:
    """(weight, scale, left, right) per term, ΔW = scale·left·right laid out as the weight, when every term is a
    plain LoRA (as `ops` builds them: a power-of-two scale folded into `right`, which rounds nothing)."""
    if any(t.module.variant != "lora" for t in task.terms):
        return None
    pairs = []
    for term in task.terms:
        a = factors[term.adapter, term.module.a_key].float()
        b = factors[term.adapter, term.module.b_key].float()
        left, right = (a.T, b.T) if term.module.fan_in_fan_out else (b, a)
        scale = term.module.scale
        if math.frexp(scale)[0] == 0.5:
            right, scale = right * scale, 1.0
        pairs.append((term.weight, scale, left, right))
    return pairs


def merge_lora(pairs: list, chunk: Chunk, base, merged: torch.Tensor, delta: torch.Tensor) -> tuple[float, float]:
    """merged = base + Σ wᵢ·sᵢ·(left·right)ᵢ on the chunk, in the order and roundings of `ops.compute_task`.

    Returns max |wᵢ·ΔWᵢ| and ‖ΔW‖² (the last term's ΔW when there is one, else merged − base).
    """
    rows, cols = slice(chunk.row, chunk.row_stop), slice(chunk.col, chunk.col_stop)
    largest, source = 0.0, base
    for weight, scale, left, right in pairs:
        torch.mm(left[rows], right[:, cols], out=delta)
        if scale != 1.0:
            delta.mul_(scale)
        low, high = torch.aminmax(delta)
        largest = max(largest, abs(weight) * max(-float(low), float(high)))
        torch.add(source, delta, alpha=weight, out=merged)
        source = merged
    if len(pairs) == 1:
        return largest, (pairs[0][0] * float(torch.linalg.vector_norm(delta))) ** 2
    return largest, float(torch.linalg.vector_norm(torch.sub(merged, base, out=delta))) ** 2
