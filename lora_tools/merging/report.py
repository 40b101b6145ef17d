"""What a merge or un-merge did (or, with --dry-run, would do): one row per changed tensor, and the totals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..adapters.model import Adapter
from ..planning.merge_plan import TensorTask

__all__ = ["TensorChange", "MergeReport", "describe_terms", "qualified_name"]


@dataclass(frozen=True)
class TensorChange:
    """One output tensor an adapter changed, and by how much."""

    tensor: str
    terms: list[dict]
    max_abs_delta: float | None = None
    rounding_error: float | None = None  # float8 outputs: max |stored − exact| the cast back added


@dataclass(frozen=True)
class MergeReport:
    """What a merge or un-merge did (or, with dry_run, would do)."""

    operation: str
    base: str
    adapters: list[str]
    weights: list[float]
    output: str
    device: str
    dry_run: bool
    tensors_changed: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    files: list[str]
    changes: list[TensorChange]
    warnings: list[str] = field(default_factory=list)
    checksums: dict[str, str] | None = None
    #: per quantized format: merged tensors, max and mean ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖ (see lora_tools.quant)
    quantization: dict[str, dict] = field(default_factory=dict)
    executor: str = "local"  # where the output shards were written: "local" or "ray"
    nodes: int = 1  # machines that wrote them

    @property
    def max_abs_delta(self) -> float:
        return max((c.max_abs_delta or 0.0 for c in self.changes), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_delta": self.max_abs_delta}


def describe_terms(task: TensorTask, adapters: Sequence[Adapter]) -> list[dict]:
    terms = [
        {
            "adapter": str(adapters[t.adapter].path),
            "module": t.module.name,
            "kind": "bias" if t.bias else t.module.kind,
            "rank": t.module.rank,
            "scale": t.module.scale,
            "weight": t.weight,
            "dora": t.module.dora and not t.bias,
        }
        for t in task.terms
    ]
    terms += [
        {"adapter": str(adapters[i].path), "replaced_by": item.key, "origin": item.origin, "weight": share}
        for i, item, share in task.replacements
    ]
    return terms


def qualified_name(component: str | None, name: str) -> str:
    return f"{component}/{name}" if component else name
