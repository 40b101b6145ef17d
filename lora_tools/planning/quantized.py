"""Planning over quantized bases: logical merge tasks turned back into stored tensors (pure).

The planner sees each quantized weight as one fp32 tensor (`quant.layout.planning_view`);
`adapt_plan` turns the logical tasks back into the stored data and scale tensors (or,
with `--dtype`, one plain tensor) and says which output tensors the quantized path
produces. The merge queues its kernel copies of the tensors that pass unchanged before
torch is imported, so that the import runs while they do: `QuantizedRoutes` tells it
which tensors the quantized path writes instead, and `merging.quantized` builds the
executor on it once torch is in.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..quant.layout import QuantizedWeight, QuantLayout
from .merge_plan import MergePlan, TensorTask
from .shards import plan_shards

__all__ = ["adapt_plan", "QuantizedRoutes"]


def adapt_plan(
    plan: MergePlan, layout: QuantLayout | None, output_dtype: str | None, max_shard_size: int
) -> tuple[MergePlan, dict[str, tuple[QuantizedWeight, TensorTask]]]:
    """Turn logical tasks back into stored tensors, and say which tasks the quantized path produces.

    Returns:
        The plan to write, and for each output tensor produced by dequantizing (and
        requantizing) its weight and the logical task that computes the weight. That
        task reads "F32" when the format is kept (requantized), the stored dtype with `--dtype`.
    """
    if layout is None:
        return plan, {}
    dropped = {name for w in layout.weights.values() for name in w.drop} if output_dtype else set()
    tasks: list[TensorTask] = []
    produced: dict[str, tuple[QuantizedWeight, TensorTask]] = {}
    for task in plan.tasks:
        weight = layout.weights.get(task.source)
        if task.name in dropped:
            continue
        if weight is None:
            tasks.append(task)
        elif output_dtype is not None:
            logical = replace(task, in_dtype=weight.data.dtype, out_dtype=output_dtype)
            tasks.append(logical)
            produced[logical.name] = (weight, logical)
        else:
            logical = replace(task, in_dtype="F32", out_dtype="F32")
            for info, changes in ((weight.data, True), (weight.scale, False)):
                stored = TensorTask(info.name, info.name, info.shape, info.dtype, info.dtype)
                if changes:
                    stored = replace(stored, terms=task.terms, replacements=task.replacements)
                tasks.append(stored)
                if task.changed:
                    produced[info.name] = (weight, logical)
    shards = plan_shards([task.nbytes for task in tasks], max_shard_size)
    return replace(plan, tasks=tasks, shards=shards), produced


@dataclass
class QuantizedRoutes:
    """The output tensors `adapt_plan` routed to the quantized path, by name: (weight, its logical task)."""

    produced: dict[str, tuple[QuantizedWeight, TensorTask]]

    def handles(self, name: str) -> bool:
        return name in self.produced
