"""One module of an extraction, on a worker: Δ = W_tuned − W_base in fp32, its truncated SVD, the error kept.

Balanced factors A = √S·Vhᵣ, B = Uᵣ·√S (alpha = rank, so the scale is 1); the
randomized SVD is seeded by the module's name, so the adapter is byte-identical
for any number of workers.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import trace
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import TensorInfo
from ..layouts.expert_extraction import extract_expert_factors, relative_error
from ..lowrank.rank import RankRule
from ..lowrank.svd import factorize
from .plan import ExtractTask

if TYPE_CHECKING:
    import torch

__all__ = [
    "ModuleResult",
    "ModuleExtractor",
    "seed",
    "factor_shapes",
    "experts_result",
    "changed_skipped_embeddings",
    "changed_one_dimensional",
    "traced",
]


@dataclass
class ModuleResult:
    """What a worker made of one extraction task (factors, the whole tuned tensor, or nothing)."""

    task: ExtractTask
    numel: int
    unchanged: bool = False
    whole: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    error: float = 0.0
    method: str = ""


def seed(name: str) -> int:
    """The randomized SVD's seed for a module: from its name, so results do not depend on order or workers."""
    return zlib.crc32(name.encode())


def factor_shapes(task: ExtractTask, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape matrix factors into the tensor shapes PEFT stores for this layer kind."""
    if task.kind == "conv":
        rank = a.shape[0]
        return b.reshape(b.shape[0], rank, *([1] * (len(task.shape) - 2))), a.reshape(rank, *task.shape[1:])
    return b, a


@dataclass(frozen=True)
class ModuleExtractor:
    """Δ of one module and its factors, for a worker thread: reads both checkpoints, writes nothing.

    `base` and `tuned` are checkpoints (or `quant.dequantize.dequantized` views); the factors
    are rounded to `factor_dtype` and the reported error is that of what is stored.
    """

    base: object
    tuned: object
    rule: RankRule
    method: str
    factor_dtype: torch.dtype
    embeddings: str

    def __call__(self, task: ExtractTask, workspace) -> ModuleResult:
        import torch

        if task.kind == "experts":  # a fused in-memory parameter: a PEFT target_parameters LoRA
            return experts_result(task, self.base, self.tuned, self.rule, self.method, self.factor_dtype)
        info = self.base.tensors[task.tensor]
        compute = torch.float64 if info.dtype == "F64" else torch.float32
        # read through mappings into one reused buffer: no tensor-sized allocation (a page fault per 4 KiB) per module
        with _values(self.tuned, task.tensor) as tuned_values, _values(self.base, task.tensor) as base_values:
            delta = workspace.get("delta", info.shape, compute).copy_(tuned_values)
            delta.sub_(base_values.to(workspace.device))  # promoted to `compute` exactly, as a converted copy would be
        if not bool(delta.any()):
            return ModuleResult(task, delta.numel(), unchanged=True)
        if task.embedding_like and self.embeddings == "full":
            return ModuleResult(task, delta.numel(), whole=self.tuned.read(task.tensor))
        matrix = delta.reshape(delta.shape[0], -1) if task.kind == "conv" else delta
        if task.kind == "embedding" or task.fan_in_fan_out:
            matrix = matrix.T
        scratch = workspace.get("scratch", matrix.shape, compute)
        b, a, used = factorize(matrix, self.rule, self.method, seed=seed(task.module), scratch=scratch)
        # relative error of what is stored: ‖Δ − B·A‖ / ‖Δ‖, after rounding the factors
        b_out, a_out = b.to(self.factor_dtype), a.to(self.factor_dtype)
        norm = float(torch.linalg.vector_norm(matrix))
        residual = float(
            torch.linalg.vector_norm(matrix.addmm_(b_out.to(matrix.dtype), a_out.to(matrix.dtype), alpha=-1))
        )
        b_out, a_out = factor_shapes(task, b_out.cpu(), a_out.cpu())
        return ModuleResult(
            task, delta.numel(), factors=(b_out, a_out), error=residual / norm if norm else 0.0, method=used
        )


def experts_result(task, base_checkpoint, tuned_checkpoint, rule: RankRule, method: str, factor_dtype):
    """One fused expert parameter's stacked factors (`expert_extraction`), as a worker's result."""

    def factor(matrix, seed_name):
        return factorize(matrix, rule, method, seed=seed(seed_name))

    numel = sum(base_checkpoint.tensors[name].numel for name in task.sources)
    found = extract_expert_factors(task, base_checkpoint.read, tuned_checkpoint.read, factor)
    if found is None:
        return ModuleResult(task, numel, unchanged=True)
    b, a, deltas, used = found
    b_out, a_out = b.to(factor_dtype).cpu(), a.to(factor_dtype).cpu()
    return ModuleResult(task, numel, factors=(b_out, a_out), error=relative_error(b_out, a_out, deltas), method=used)


def _values(checkpoint, name: str) -> AbstractContextManager[torch.Tensor]:
    """One tensor's values: a read-only mapping of a plain checkpoint's file, else a fresh read (which, for a
    `quant.dequantized` checkpoint, dequantizes)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.mapped(name)
    return nullcontext(checkpoint.read(name))


def changed_skipped_embeddings(skipped: list[dict], base_checkpoint, tuned_checkpoint) -> list[str]:
    """The embeddings the plan skipped that differ between BASE and TUNED."""
    with trace.span("compare skipped embeddings"):
        return [
            item["name"]
            for item in skipped
            if item["reason"].startswith("embedding")
            and _differ(base_checkpoint.tensors[item["name"]], tuned_checkpoint.tensors[item["name"]])
        ]


def traced(fn):
    """`fn(task, workspace)` in a trace span named after the task's tensor (see `lora_tools.trace`)."""

    def run(task, workspace):
        with trace.span("module", task.tensor):
            return fn(task, workspace)

    return run


def _differ(first: TensorInfo, second: TensorInfo, chunk_bytes: int = 16 << 20) -> bool:
    """Whether two stored tensors differ, compared through small mappings."""
    import torch

    from ..io.tensors import mapped_tensor

    if first.offset is None or second.offset is None or first.dtype != second.dtype:
        return True
    itemsize = first.nbytes // max(first.numel, 1)
    step = max(1, chunk_bytes // max(itemsize, 1))
    for start in range(0, first.numel, step):
        count = min(step, first.numel - start)
        with (
            mapped_tensor(first.file, first.offset + start * itemsize, first.dtype, (count,)) as a,
            mapped_tensor(second.file, second.offset + start * itemsize, second.dtype, (count,)) as b,
        ):
            if not torch.equal(a, b):
                return True
    return False


def changed_one_dimensional(names: Sequence[str], base, tuned) -> list[dict]:
    changed = []
    for name in names:
        difference = (tuned.read(name).double() - base.read(name).double()).abs()
        if difference.numel() and float(difference.max()) > 0:
            changed.append({"name": name, "max_abs_change": float(difference.max())})
    return changed
