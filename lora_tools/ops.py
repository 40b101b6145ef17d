"""LoRA arithmetic on tensors: ΔW per layer kind, DoRA, and one output tensor per task.

All sums are taken in fp32 (fp64 for fp64 bases) and rounded once to the
output dtype, which is how results stay within one ulp of exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapter import LoraModule
from .errors import NonFiniteError
from .plan import TensorTask
from .tensors import to_torch_dtype

__all__ = ["dora_norm", "Workspace", "TaskResult", "compute_task"]

Fetch = Callable[[int, str], torch.Tensor]


def dora_norm(module: LoraModule, merged: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ per output channel, over the axes PEFT uses for this layer kind."""
    if module.kind == "conv":
        return merged.reshape(merged.shape[0], -1).norm(p=2, dim=1)
    rows = merged.T if module.fan_in_fan_out else merged
    return torch.linalg.norm(rows, dim=1)


def _per_output(module: LoraModule, factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if module.kind == "conv":
        return factor.reshape(-1, *([1] * (like.dim() - 1)))
    return factor.reshape(1, -1) if module.fan_in_fan_out else factor.reshape(-1, 1)


class Workspace:
    """Reusable flat buffers, grown to the largest tensor seen.

    Fresh tensor-sized allocations cost a page fault per 4 KiB and dominate a
    streaming merge; reusing a few buffers makes each pass run at memory speed
    and keeps peak memory at a few of the largest tensors.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=self.device)
            self._buffers[role] = buffer
        return buffer[:numel].view(shape)


@dataclass
class TaskResult:
    tensor: torch.Tensor
    max_abs_delta: float
    dora_norm: torch.Tensor | None = None


def _delta_into(module: LoraModule, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """B·A (unscaled) written into `out`, laid out like the base weight."""
    if module.kind == "conv":
        torch.mm(b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), out=out.view(out.shape[0], -1))
    elif module.kind == "embedding" or module.fan_in_fan_out:
        torch.mm(a.T, b.T, out=out)
    else:
        torch.mm(b, a, out=out)
    return out


def _largest_magnitude(tensor: torch.Tensor) -> float:
    low, high = torch.aminmax(tensor)
    return max(abs(float(low)), abs(float(high)))


def _check_finite(task: TensorTask, weight: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Refuse a result that is, or rounds to, NaN/Inf in the output dtype.

    A sum is one cheap pass that any NaN or Inf poisons; only a suspicious sum
    (or an fp16 output, whose range is small) pays for the element-wise check.
    """
    total = float(weight.sum())
    if math.isfinite(total) and abs(total) < 1e30 and out_dtype != torch.float16:
        return
    bad = int((~torch.isfinite(weight.to(out_dtype))).sum()) if out_dtype.is_floating_point else 0
    if bad:
        raise NonFiniteError(
            f"tensor {task.name!r}: the result has {bad} NaN/Inf value(s) in {task.out_dtype} "
            "(a broken adapter, a too-large weight, or an fp16 overflow; try --dtype fp32 or --allow-nonfinite)"
        )


def compute_task(
    task: TensorTask,
    base: torch.Tensor,
    fetch: Fetch,
    workspace: Workspace,
    *,
    output_slot: int = 0,
    unmerge: bool = False,
    recorded_norm: torch.Tensor | None = None,
    allow_nonfinite: bool = False,
) -> TaskResult:
    """Produce one output tensor: replacements, then Σ wᵢ·ΔWᵢ (or DoRA), one rounding.

    Args:
        fetch: reads adapter `i`'s tensor `key` onto the CPU.
        workspace: buffers to compute in; the result lives in the `output_slot` buffer
            until the same slot is used again.
        recorded_norm: for un-merging DoRA, the norm the merge recorded.

    Raises:
        NonFiniteError: the result holds NaN or Inf (unless `allow_nonfinite`).
    """
    device = workspace.device
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    weight = workspace.get("weight", base.shape, compute).copy_(base, non_blocking=True)

    def get(index: int, key: str) -> torch.Tensor:
        return fetch(index, key).to(device=device, dtype=compute, non_blocking=True)

    for index, item, share in task.replacements:
        values = get(index, item.key)
        if item.origin == "saved base layer":
            if not unmerge:
                weight.copy_(values)
        elif item.rows is None:
            if share == 1.0:
                weight.copy_(values)
            else:
                weight.add_(values - weight, alpha=share)
        else:
            rows = torch.tensor(item.rows, device=device)
            current = weight.index_select(0, rows)
            weight.index_copy_(0, rows, values if share == 1.0 else current + share * (values - current))

    max_abs = 0.0
    norm_used = None
    for term in task.terms:
        module = term.module
        if term.bias:
            delta = get(term.adapter, module.bias_key)
        else:
            a, b = get(term.adapter, module.a_key), get(term.adapter, module.b_key)
            delta = _delta_into(module, a, b, workspace.get("delta", weight.shape, compute))
        if module.scale != 1.0:
            delta.mul_(module.scale)  # scale B·A first, as PEFT does, so w = 1 rounds exactly like PEFT
        factor = term.weight
        if module.dora and not term.bias:
            magnitude = get(term.adapter, module.magnitude_key).reshape(-1)
            if unmerge:
                norm_used = recorded_norm.to(device=device, dtype=compute)
                weight.mul_(_per_output(module, norm_used / magnitude, weight)).sub_(delta)
            else:
                weight.add_(delta)
                norm_used = dora_norm(module, weight)
                weight.mul_(_per_output(module, magnitude / norm_used, weight))
            factor = 1.0
        else:
            weight.add_(delta, alpha=factor)
        if delta.numel():
            max_abs = max(max_abs, abs(factor) * _largest_magnitude(delta))

    out_dtype = to_torch_dtype(task.out_dtype)
    if weight.is_floating_point() and not allow_nonfinite:
        _check_finite(task, weight, out_dtype)
    result = workspace.get(f"out{output_slot}", weight.shape, out_dtype).copy_(weight)
    return TaskResult(result, max_abs, None if norm_used is None else norm_used.float().cpu())
