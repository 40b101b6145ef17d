"""One row of full FP8 blocks merged with one plain LoRA term in few passes (the common case, pure torch).

The general path (`execute`) dequantizes, adds ΔW and requantizes with the
functions of `fp8` and `chunks`, about twenty passes over a piece and forty torch
calls. For a piece of whole blocks across (one row of blocks or several whole
ones), merged with one LoRA term of weight 1, this does the same work in fewer: the block scales multiply the decoded
values inside the addition of ΔW (`addcmul`, one rounding instead of two, so at
most one fp32 ulp from the general path's sum), and the requantization error is
taken as ‖x − q·s‖ in one fused pass. Every other step and rounding is the general
path's: fresh scales amax / 448 in the stored dtype, x / s rounded to e4m3.
Pieces are computed by the same calls whichever worker runs them.
"""

from __future__ import annotations

import torch

from ..compute.extremes import extremes
from . import fp8_codec

__all__ = ["fits", "merge_block_row"]


def fits(rows: int, cols: int, block: tuple[int, int], pairs: list | None) -> bool:
    """Whether a piece of `rows` × `cols` takes this path: whole blocks across (one row of blocks, or several
    whole ones), one LoRA term of weight 1."""
    return (
        pairs is not None and len(pairs) == 1 and pairs[0][0] == 1.0
        and (rows <= block[0] or rows % block[0] == 0) and cols % block[1] == 0
    )  # fmt: skip


def _tiles(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A [rows, cols] buffer as [row blocks, block rows, col blocks, block cols] (a view)."""
    rows, cols = x.shape
    return x.view(max(1, rows // block[0]), -1, cols // block[1], block[1])


def merge_block_row(codes, folded, pair, rows: slice, cols: slice, block, scale_dtype, pow2, out, buffers):
    """Merge one piece; returns (its new scales, max |ΔW|, ‖ΔW‖², ‖Q(W+ΔW) − (W+ΔW)‖²), or None to use the
    general path (a NaN code in the base).

    `codes`: the piece's stored e4m3 values; `folded`: its scales × 2^120 (see `fp8_codec.fold`); `pair`:
    (weight, scale, left, right) of `chunks.lora_pairs`; `out`: the piece's place for the new e4m3 values;
    `buffers`: three fp32 buffers of the piece's shape.
    """
    base, delta, spare = buffers
    if not fp8_codec.decode(codes, base):
        return None
    _, scale, left, right = pair
    torch.mm(left[rows], right[:, cols], out=delta)
    if scale != 1.0:
        delta.mul_(scale)
    low, high = extremes(delta)
    largest, change = max(-float(low), float(high)), float(torch.linalg.vector_norm(delta)) ** 2
    tiles, grid = _tiles(base, block), folded.shape
    torch.addcmul(_tiles(delta, block), tiles, folded.view(grid[0], 1, grid[1], 1), out=tiles)  # W + ΔW
    amax = fp8_codec.block_amax(base, block)
    fresh = fp8_codec.scale_from_amax(amax, scale_dtype, pow2)
    factor = fresh.float()
    scaled = torch.div(tiles, factor.view(grid[0], 1, grid[1], 1), out=_tiles(delta, block))
    if not fp8_codec.within_range(amax, factor, scale_dtype):
        scaled.clamp_(-fp8_codec.FP8_MAX, fp8_codec.FP8_MAX)
    out.copy_(delta)
    fp8_codec.decode(out, spare, check=False)
    residual = _tiles(spare, block)
    unit = (factor * -fp8_codec.DECODE_FACTOR).view(grid[0], 1, grid[1], 1)
    torch.addcmul(tiles, residual, unit, out=residual)  # (W + ΔW) − q·s
    return fresh, largest, change, float(torch.linalg.vector_norm(spare)) ** 2
