"""Adapters whose init rewrote the base: refused before any output, or merged onto the residual PEFT computes.

A PiSSA or OLoRA adapter means W_res + s·B·A, W_res = W − s·B₀A₀ recomputed from W
(`lowrank.residual`), which is what PEFT's load-and-merge gives. With a weight w, or
beside other adapters, its change to W is taken as a task vector, (W_res − W) + s·B·A:
W' = W + Σ wᵢ·((W_res,i − W) + sᵢ·BᵢAᵢ), all in fp32 and rounded once. At w = 1 alone the
sum starts from W_res itself, the very tensor PEFT's loaded model holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..adapters.inits import merge_refusal
from ..errors import UnsupportedError
from ..lowrank.residual import RESIDUALS, REWRITABLE_DTYPES

if TYPE_CHECKING:
    import torch

    from ..adapters.model import Adapter
    from ..planning.merge_plan import MergePlan, TensorTask

__all__ = ["refuse_unmergeable", "refuse_unrewritable", "rewritten_base"]

#: safetensors dtype names of the base dtypes PEFT rewrites (`REWRITABLE_DTYPES`).
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def refuse_unmergeable(adapters: Sequence[Adapter], operation: str, residual_base: bool = False) -> list[Adapter]:
    """Refuse, before planning, adapters `operation` ("merge", "unmerge") cannot apply faithfully: aLoRA,
    layer_replication, inits that cannot be recomputed from files, any un-merge of a base-rewriting init
    (`adapters.inits.merge_refusal`).

    With `residual_base` the base given is the residual PEFT saved at init (W_res, not W): every init
    is then applied as plain s·B·A onto it, and the adapters come back without `base_init`.

    Raises:
        UnsupportedError: naming the adapter, the feature or init, and what to do.
    """
    for adapter in adapters:
        why = merge_refusal(adapter.config, operation, residual_base)
        if why is not None:
            raise UnsupportedError(f"{adapter.path}: {why}")
    if not residual_base:
        return list(adapters)
    return [dataclasses.replace(a, modules=[dataclasses.replace(m, base_init=None) for m in a.modules])
            for a in adapters]  # fmt: skip


def refuse_unrewritable(adapters: Sequence[Adapter], plans: Mapping[str | None, MergePlan]) -> None:
    """Refuse PiSSA/OLoRA modules on base tensors PEFT could not have rewritten: a dtype other than
    fp32/fp16/bf16, a tensor that is not 2-D, a row block of a fused tensor, OLoRA on an in×out (Conv1D)
    weight.

    Raises:
        UnsupportedError: listing every such module.
    """
    problems = [p for plan in plans.values() for task in plan.tasks for p in _task_problems(task, adapters)]
    if problems:
        raise UnsupportedError("cannot recompute the residual base PEFT used at init: " + "; ".join(problems))


def _task_problems(task: TensorTask, adapters: Sequence[Adapter]) -> list[str]:
    problems = []
    for term in task.terms:
        init, module = term.module.base_init, term.module
        if init is None or term.bias:
            continue
        where = f"{adapters[term.adapter].path}: {module.name} ({init})"
        if _STORED.get(task.in_dtype) not in REWRITABLE_DTYPES:
            problems.append(f"{where}: base tensor {task.name!r} is {task.in_dtype}; PEFT initialises {init} only in "
                            "fp32, fp16 or bf16")  # fmt: skip
        elif len(task.shape) != 2:
            problems.append(f"{where}: base tensor {task.name!r} has shape {list(task.shape)}; W_res is defined "
                            "for a 2-D weight")  # fmt: skip
        elif term.piece is not None:
            problems.append(f"{where}: lands in part of the fused base tensor {task.name!r}; W_res is defined for "
                            "the module's own weight")  # fmt: skip
        elif init == "olora" and module.fan_in_fan_out:
            problems.append(f"{where}: OLoRA on an in×out (fan_in_fan_out) weight, which PEFT cannot load")
    return problems


def rewritten_base(task: TensorTask, base: torch.Tensor) -> torch.Tensor:
    """The base this task's sum starts from: `base` itself, or, for PiSSA/OLoRA terms, W_res (one such term
    at weight 1) or W + Σ wᵢ·(W_res,i − W) in fp32 (otherwise)."""
    terms = [t for t in task.terms if t.module.base_init is not None and not t.bias and t.piece is None]
    if not terms:
        return base
    if tuple(base.shape) != tuple(task.shape):  # a chunk of a quantized weight's rows: W_res needs all of W
        raise UnsupportedError(f"tensor {task.name!r}: the PiSSA/OLoRA residual needs the whole weight, "
                               f"got a part of shape {list(base.shape)}")  # fmt: skip
    import torch

    residuals = [
        RESIDUALS[t.module.base_init](base, t.module.rank, t.module.scale, t.module.fan_in_fan_out) for t in terms
    ]
    if len(terms) == 1 and terms[0].weight == 1.0:
        return residuals[0]
    start = base.to(torch.float32, copy=True)
    for term, residual in zip(terms, residuals, strict=True):
        start.add_(residual.to(torch.float32) - base.to(torch.float32), alpha=term.weight)
    return start
