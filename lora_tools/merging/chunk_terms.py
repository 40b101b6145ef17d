"""The LoRA terms of a merge task restricted to one chunk of a quantized weight (pure torch, no I/O).

A plain LoRA's ΔW on a chunk is B[rows]·A[:, cols]; an expert LoRA's on a run of
experts is built from their rows of A and columns of B. `merge_lora` adds the terms
in the order and with the roundings of `arithmetic.compute_task`.
"""

from __future__ import annotations

import math

import torch

from ..compute.extremes import extremes
from ..planning.merge_plan import TensorTask
from ..quant.chunks import Chunk
from .arithmetic import Fetch

__all__ = ["row_local", "window", "lora_pairs", "merge_lora"]


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
    plain LoRA (as `arithmetic` builds them: a power-of-two scale folded into `right`, which rounds nothing)."""
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
    """merged = base + Σ wᵢ·sᵢ·(left·right)ᵢ on the chunk, in the order and roundings of `arithmetic.compute_task`.

    Returns max |wᵢ·ΔWᵢ| and ‖ΔW‖² (the last term's ΔW when there is one, else merged − base).
    """
    rows, cols = slice(chunk.row, chunk.row_stop), slice(chunk.col, chunk.col_stop)
    largest, source = 0.0, base
    for weight, scale, left, right in pairs:
        torch.mm(left[rows], right[:, cols], out=delta)
        if scale != 1.0:
            delta.mul_(scale)
        low, high = extremes(delta)
        largest = max(largest, abs(weight) * max(-float(low), float(high)))
        torch.add(source, delta, alpha=weight, out=merged)
        source = merged
    if len(pairs) == 1:
        return largest, (pairs[0][0] * float(torch.linalg.vector_norm(delta))) ** 2
    return largest, float(torch.linalg.vector_norm(torch.sub(merged, base, out=delta))) ** 2
