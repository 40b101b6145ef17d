"""The executor hook for quantized weights: dequantize, let the merge compute, requantize or cast.

The merge loop hands every output tensor that `adapt_plan` marked as produced
here to `QuantizedTensors.write`. The first of a weight's stored tensors to come
triggers the work: the weight is dequantized into an fp32 buffer, the ordinary
merge computation writes W + ΔW into a second one, and that is requantized (fresh
scales) or cast; the weight's other stored tensor waits in memory for its turn.
Row chunks keep the other temporaries small, so peak memory is two fp32 copies
of the largest quantized weight (the dequantized base and the merged result).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import NonFiniteError
from ..io.tensors import TORCH_DTYPES, tensor_bytes
from ..plan import TensorTask
from . import fp8, mxfp4
from .layout import QuantizedWeight

__all__ = ["REQUANTIZATION_WARN_RATIO", "QuantizedTensors", "dequantize", "requantize", "requantization_summary"]

#: Warn when ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖ of a merged tensor exceeds this: the rounding requantization adds is then
#: more than half the adapter's own change to the weight (1 is what an adapter lost entirely to rounding gives,
#: since then Q(W+ΔW) = W). Writing a plain model with --dtype bf16 keeps the whole change.
REQUANTIZATION_WARN_RATIO = 0.5

_CHUNK_ELEMENTS = 1 << 20
#: (logical task, dequantized base, destination) → the merge's TaskResult, written into destination
Compute = Callable[[TensorTask, torch.Tensor, torch.Tensor], object]


def _row_step(weight: QuantizedWeight) -> int:
    """Rows (experts for MXFP4) per chunk: whole scale blocks, about a million values."""
    per_row = math.prod(weight.shape[1:])
    align = weight.block[0] if weight.block else 1
    return max(1, _CHUNK_ELEMENTS // (per_row * align)) * align


def _scale_rows(weight: QuantizedWeight, start: int, stop: int) -> slice | None:
    if weight.scheme == "fp8-tensor":
        return None
    if weight.scheme == "fp8-block":
        return slice(start // weight.block[0], math.ceil(stop / weight.block[0]))
    return slice(start, stop)


def _dequantize_rows(weight: QuantizedWeight, data, scale, start: int, stop: int, out: torch.Tensor) -> None:
    rows = _scale_rows(weight, start, stop)
    part = scale if rows is None else scale[rows]
    if weight.scheme == "fp8-block":
        fp8.dequantize_blocks(data[start:stop], part, weight.block, out=out)
    elif weight.scheme == "mxfp4":
        out.copy_(mxfp4.dequantize(data[start:stop], part))
    else:
        fp8.dequantize_scaled(data[start:stop], part, out=out)


def dequantize(weight: QuantizedWeight, data: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The fp32 logical weight (in `out`) from its stored tensors, a chunk of rows at a time."""
    step = _row_step(weight)
    for start in range(0, weight.shape[0], step):
        stop = min(weight.shape[0], start + step)
        _dequantize_rows(weight, data, scale, start, stop, out[start:stop])
    return out


def requantize(weight: QuantizedWeight, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (data, scale) in the weight's stored format, shapes and dtypes for fp32 `values`."""
    data = torch.empty(weight.data.shape, dtype=TORCH_DTYPES[weight.data.dtype])
    scale = torch.empty(weight.scale.shape, dtype=TORCH_DTYPES[weight.scale.dtype])
    scale_dtype = scale.dtype
    fixed = None
    if weight.scheme == "fp8-tensor":
        amax = max((float(values[s : s + 4096].abs().amax()) for s in range(0, values.shape[0], 4096)), default=0.0)
        fixed = torch.tensor(amax / fp8.FP8_MAX if amax > 0 else 1.0, dtype=torch.float32).to(scale_dtype)
        scale.copy_(fixed.reshape(scale.shape) if scale.dim() else fixed)
    step = _row_step(weight)
    for start in range(0, weight.shape[0], step):
        stop = min(weight.shape[0], start + step)
        rows, part = _scale_rows(weight, start, stop), values[start:stop]
        if weight.scheme == "fp8-block":
            _, scale[rows] = fp8.quantize_blocks(part, weight.block, scale_dtype, out=data[start:stop])
        elif weight.scheme == "mxfp4":
            data[start:stop], scale[rows] = mxfp4.quantize(part)
        elif weight.scheme == "fp8-channel":
            shape = (stop - start, *weight.scale.shape[1:])
            _, scale[rows] = fp8.quantize_scaled(part, shape, scale_dtype, out=data[start:stop])
        else:
            data[start:stop].copy_((part / fixed.float()).clamp_(-fp8.FP8_MAX, fp8.FP8_MAX))
    return data, scale


def _requantization_error(weight: QuantizedWeight, fresh, merged: torch.Tensor) -> float:
    """‖Q(W+ΔW) − (W+ΔW)‖, dequantizing the fresh tensors a chunk of rows at a time."""
    error = 0.0
    step = _row_step(weight)
    buffer = torch.empty((min(step, weight.shape[0]), *weight.shape[1:]), dtype=torch.float32)
    for start in range(0, weight.shape[0], step):
        stop = min(weight.shape[0], start + step)
        _dequantize_rows(weight, *fresh, start, stop, buffer[: stop - start])
        error += float(torch.dist(buffer[: stop - start], merged[start:stop])) ** 2
    return math.sqrt(error)


@dataclass
class QuantizedTensors:
    """Produces the output tensors `adapt_plan` routed to the quantized path, one weight at a time."""

    produced: dict[str, tuple[QuantizedWeight, TensorTask]]
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        self.pending: dict[str, torch.Tensor] = {}
        self.ratios: dict[str, list[float]] = {}
        self._flat: dict[str, torch.Tensor] = {}

    def handles(self, name: str) -> bool:
        return name in self.produced

    def write(self, task: TensorTask, base, writer, compute: Compute):
        """Write output tensor `task` into `writer`; returns compute's result when this call merged the weight."""
        result = None
        if task.name not in self.pending:
            result = self._produce(*self.produced[task.name], base, compute)
        writer.write(task.name, tensor_bytes(self.pending.pop(task.name)))
        return result

    def _buffer(self, role: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A reused fp32 CPU buffer (fresh tensor-sized allocations cost a page fault per 4 KiB)."""
        flat = self._flat.get(role)
        if flat is None or flat.numel() < math.prod(shape):
            flat = self._flat[role] = torch.empty(math.prod(shape), dtype=torch.float32)
        return flat[: math.prod(shape)].view(shape)

    def _produce(self, weight: QuantizedWeight, logical: TensorTask, base, compute: Compute):
        result = None
        with base.mapped(weight.data.name) as data, base.mapped(weight.scale.name) as scale:
            values = dequantize(weight, data, scale, self._buffer("base", weight.shape))
        merged = values
        if logical.changed:
            merged = self._buffer("merged", weight.shape)
            result = compute(logical, values, merged)
        if logical.in_dtype != "F32":  # --dtype: the logical task reads the stored dtype (see adapt_plan)
            self.pending[logical.name] = self._cast(logical, merged)
            return result
        fresh = requantize(weight, merged)
        change = float(torch.dist(merged, values)) if logical.changed else 0.0
        if change > 0:
            self.ratios.setdefault(weight.format, []).append(_requantization_error(weight, fresh, merged) / change)
        self.pending.update(zip(weight.stored, fresh, strict=True))
        return result

    def _cast(self, logical: TensorTask, values: torch.Tensor) -> torch.Tensor:
        result = values.to(TORCH_DTYPES[logical.out_dtype])
        if not self.allow_nonfinite and result.is_floating_point() and not bool(torch.isfinite(result).all()):
            raise NonFiniteError(
                f"tensor {logical.name!r}: the dequantized result overflows {logical.out_dtype} (try --dtype fp32)"
            )
        return result


def requantization_summary(writers) -> tuple[dict[str, dict], list[str]]:
    """Per format: merged tensors, max and mean ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖; and warnings above the threshold."""
    ratios: dict[str, list[float]] = {}
    for writer in writers:
        for name, values in writer.ratios.items():
            ratios.setdefault(name, []).extend(values)
    summary = {
        name: {"tensors": len(values), "max": max(values), "mean": sum(values) / len(values)}
        for name, values in ratios.items()
    }
    warnings = [
        f"{name}: requantizing the merged weights adds error up to {row['max']:.3g}× the adapter's own change "
        f"(‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖ > {REQUANTIZATION_WARN_RATIO:g}, and 1 means the adapter is lost to rounding); "
        "--dtype bf16 writes a plain model that keeps all of it"
        for name, row in summary.items()
        if row["max"] > REQUANTIZATION_WARN_RATIO
    ]
    return summary, warnings
