"""LoRA arithmetic on tensors: ΔW per layer kind, DoRA, and one output tensor per task.

All sums are taken in fp32 (fp64 for fp64 bases) and rounded once to the
output dtype, which is how results stay within one ulp of exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapter import LoraModule
from .errors import NonFiniteError
from .plan import TensorTask
from .tensors import to_torch_dtype

__all__ = ["lora_delta", "dora_norm", "TaskResult", "compute_task"]

Fetch = Callable[[int, str], torch.Tensor]


def lora_delta(module: LoraModule, a: torch.Tensor, b: torch.Tensor, weight_shape: torch.Size) -> torch.Tensor:
    """scale · B·A laid out like the base weight (transposed for Conv1D and embeddings, reshaped for conv)."""
    if module.kind == "conv":
        delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(weight_shape)
    else:
        delta = b @ a
        if module.kind == "embedding" or module.fan_in_fan_out:
            delta = delta.T
    return delta * module.scale


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


@dataclass
class TaskResult:
    tensor: torch.Tensor
    max_abs_delta: float
    dora_norm: torch.Tensor | None = None


def compute_task(
    task: TensorTask,
    base: torch.Tensor,
    fetch: Fetch,
    device: torch.device,
    *,
    unmerge: bool = False,
    recorded_norm: torch.Tensor | None = None,
    allow_nonfinite: bool = False,
) -> TaskResult:
    """Produce one output tensor: replacements, then Σ wᵢ·ΔWᵢ (or DoRA), one rounding.

    Args:
        fetch: reads adapter `i`'s tensor `key` onto the CPU.
        recorded_norm: for un-merging DoRA, the norm the merge recorded.

    Raises:
        NonFiniteError: the result holds NaN or Inf (unless `allow_nonfinite`).
    """
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    weight = base.to(device=device, dtype=compute, non_blocking=True)

    def get(index: int, key: str) -> torch.Tensor:
        return fetch(index, key).to(device=device, dtype=compute, non_blocking=True)

    for index, item, share in task.replacements:
        values = get(index, item.key)
        if item.origin == "saved base layer":
            if not unmerge:
                weight = values
        elif item.rows is None:
            weight = values if share == 1.0 else weight + share * (values - weight)
        else:
            rows = torch.tensor(item.rows, device=device)
            current = weight.index_select(0, rows)
            weight = weight.index_copy(0, rows, values if share == 1.0 else current + share * (values - current))

    max_abs = 0.0
    norm_used = None
    for term in task.terms:
        module = term.module
        if term.bias:
            delta = get(term.adapter, module.bias_key) * module.scale
        else:
            delta = lora_delta(module, get(term.adapter, module.a_key), get(term.adapter, module.b_key), weight.shape)
        if module.dora and not term.bias:
            magnitude = get(term.adapter, module.magnitude_key).reshape(-1)
            if unmerge:
                norm_used = recorded_norm.to(device=device, dtype=compute)
                weight = weight * _per_output(module, norm_used / magnitude, weight) - delta
            else:
                combined = weight + delta
                norm_used = dora_norm(module, combined)
                weight = _per_output(module, magnitude / norm_used, combined) * combined
        elif term.weight == 1.0:
            weight = weight + delta
        elif term.weight == -1.0:
            weight = weight - delta
        else:
            delta = term.weight * delta
            weight = weight + delta
        if delta.numel():
            max_abs = max(max_abs, float(delta.abs().max()))

    out_dtype = to_torch_dtype(task.out_dtype)
    result = weight.to(out_dtype)
    if result.is_floating_point() and not allow_nonfinite and not bool(torch.isfinite(result).all()):
        bad = int((~torch.isfinite(result)).sum())
        raise NonFiniteError(
            f"tensor {task.name!r}: the result has {bad} NaN/Inf value(s) in {task.out_dtype} "
            "(a broken adapter, a too-large weight, or an fp16 overflow; try --dtype fp32 or --allow-nonfinite)"
        )
    return TaskResult(result, max_abs, None if norm_used is None else norm_used.float().cpu())
