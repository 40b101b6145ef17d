"""One output tensor per merge task: fp32 sums, one rounding, row blocks dealt to the cores.

All sums are taken in fp32 (fp64 for fp64 bases) and rounded once to the output
dtype, which is how results stay within one ulp of exact. A plain LoRA tensor is
computed in blocks of rows, each written into its place in the output as soon as it
is rounded; other tensors (DoRA, variants, replacements, fused pieces) whole.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..compute.extremes import extremes
from ..compute.pool import BlockPool
from ..compute.workspace import Workspace
from ..errors import NonFiniteError
from ..io.rows import RowSink
from ..ops import dora_norm, low_rank_pair, per_output, variant_delta
from ..planning.merge_plan import TensorTask
from ..quant.float8_casts import is_fp8, rounding_error
from ..tuners import is_transform, transform
from .inits import rewritten_base

__all__ = ["Fetch", "TaskResult", "BlockedTask", "blockwise", "compute_task", "overflow_limit"]

Fetch = Callable[[int, str], torch.Tensor]

_BLOCK_BYTES = 1 << 20


@dataclass
class TaskResult:
    max_abs_delta: float
    dora_norm: torch.Tensor | None = None
    rounding_error: float | None = None  # float8 outputs: what rounding back added


def _largest_magnitude(tensor: torch.Tensor) -> float:
    low, high = extremes(tensor)
    return max(abs(float(low)), abs(float(high)))


def _check_finite(task: TensorTask, result: torch.Tensor) -> None:
    """Refuse a result that is, or rounded to, NaN/Inf in the output dtype.

    One min/max pass over the rounded result (NaN and Inf both reach it); the
    element-wise count runs only to word the error.
    """
    if not result.is_floating_point() or result.numel() == 0:
        return
    low, high = extremes(result)
    if math.isfinite(float(low)) and math.isfinite(float(high)):
        return
    bad = int((~torch.isfinite(result)).sum())
    raise NonFiniteError(
        f"tensor {task.name!r}: the result has {bad} NaN/Inf value(s) in {task.out_dtype} "
        "(a broken adapter, a too-large weight, or an fp16 overflow; try --dtype fp32 or --allow-nonfinite)"
    )


@functools.cache
def overflow_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to ±Inf in `dtype` (round to nearest, ties to even).

    Halfway between the largest finite value and the next power of two; the largest finite
    value has an odd significand, so the tie rounds up, to Inf.
    """
    info = torch.finfo(dtype)
    ulp = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    return info.max + ulp / 2


def _rounds_finite(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value of `values` (a few: the smallest and largest of each block) stays finite
    once rounded to `dtype`; NaN fails.

    From fp32 to an output of at most its range, two comparisons against `overflow_limit` replace
    the rounding itself. Rounding is monotonic, so a block's values all round to finite numbers
    exactly when its smallest and largest do: the blocked path checks those two per block.
    """
    if values.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return bool(torch.isfinite(values.to(dtype)).all())  # fp64 → bf16 rounds twice, via fp32
    limit = math.inf if dtype == torch.float32 else overflow_limit(dtype)
    return bool(((values > -limit) & (values < limit)).all())


def blockwise(task: TensorTask, base_dim: int, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `compute_task` computes this task in row blocks (plain LoRA terms on the CPU), so it can
    take a `RowSink` as its destination."""
    return (
        device.type == "cpu"
        and bool(task.terms)
        and not task.replacements
        and base_dim >= 2
        and out_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)
        and all(not t.bias and not t.module.dora and t.module.variant == "lora" and t.piece is None for t in task.terms)
        and not any(t.module.base_init for t in task.terms)  # PiSSA/OLoRA: the whole W for its residual
    )


def _run_blocked(blocked: BlockedTask, pool: BlockPool | None) -> TaskResult:
    """A `BlockedTask`'s blocks on the pool's workers (or this thread), then its result."""
    if pool is not None:
        pool.each(blocked.count, blocked.run)
    else:
        for index in range(blocked.count):
            blocked.run(0, index)
    return blocked.finish()


class BlockedTask:
    """W + Σ wᵢ·sᵢ·BᵢAᵢ one block of rows at a time, so every pass runs in cache: `run(worker, index)`
    for each of the `count` blocks, on any workers in any order, then `finish()` for the result.

    The same operations in the same order as the whole-tensor path (so the same
    bits), but each block is read from memory once and written once. Every block
    is computed by the same calls whichever worker runs it, so the bits do not depend
    on the number of workers. `base` may be `destination` itself: each block is read
    before it is written.

    Every view a block needs is made here, and each block's extremes are kept as
    tensors and read once, in `finish`: in a worker's loop, every call computes and lets
    go of the GIL, so two workers seldom wait for each other.
    """

    def __init__(
        self,
        task: TensorTask,
        base: torch.Tensor,
        fetch: Fetch,
        workspace: Workspace,
        destination: torch.Tensor,
        allow_nonfinite: bool,
    ) -> None:
        compute = torch.float64 if base.dtype == torch.float64 else torch.float32
        rows = base.shape[0]
        base_2d = base.reshape(rows, -1)
        self.task, self.destination = task, destination
        self.sink = destination if isinstance(destination, RowSink) else None
        self.block = max(1, _BLOCK_BYTES // (base_2d.shape[1] * 4))
        self.pairs = []  # (weight, left's blocks, right, scale) per term
        for term in task.terms:
            a = fetch(term.adapter, term.module.a_key).to(compute)
            b = fetch(term.adapter, term.module.b_key).to(compute)
            left, right = low_rank_pair(term.module, a, b)
            scale = term.module.scale
            if math.frexp(scale)[0] == 0.5:  # a power of two scales exactly, so fold it into the factor once
                right, scale = right * scale, 1.0
            self.pairs.append((term.weight, left.split(self.block), right, scale))
        self.check = not allow_nonfinite and destination.dtype.is_floating_point and math.prod(destination.shape) > 0
        self.bases = base_2d.split(self.block)
        self.count = len(self.bases)
        self.counts = [len(part) for part in self.bases]
        self.outs = destination.view(rows, -1).split(self.block) if self.sink is None else None
        # per block: (min, max) of each ΔWᵢ, then of W', as 0-d tensors
        self.found: list[list] = [[None] * (len(self.pairs) + 1) for _ in self.bases]
        rounded = destination.dtype if self.sink is not None else None
        self.buffers = _BlockBuffers(workspace, base_2d.shape[1], compute, rounded)

    def run(self, worker: int, index: int) -> None:
        """Compute block `index` with worker `worker`'s buffers, and write it."""
        weight, delta_buffer, rounded, data = self.buffers.get(worker, self.counts[index])
        weight.copy_(self.bases[index])
        found = self.found[index]
        for term, (factor, lefts, right, scale) in enumerate(self.pairs):
            delta = torch.mm(lefts[index], right, out=delta_buffer)
            if scale != 1.0:
                delta.mul_(scale)
            found[term] = extremes(delta)
            weight.add_(delta, alpha=factor)
        if self.check:
            found[-1] = extremes(weight)
        if self.sink is None:
            self.outs[index].copy_(weight)
        else:  # rounded rows, written with pwrite
            rounded.copy_(weight)
            self.sink.write_bytes(index * self.block, data)

    def finish(self) -> TaskResult:
        """The result, once every block ran: refuse a NaN/Inf result, and the largest weighted ΔW."""
        if self.check and not _rounds_finite(_stacked(row[-1] for row in self.found), self.destination.dtype):
            if self.sink is None:
                _check_finite(self.task, self.destination)
            else:
                with self.sink.written() as result:
                    _check_finite(self.task, result)
        largest = _largest_per_term(_stacked(pair for row in self.found for pair in row[:-1]), len(self.pairs))
        return TaskResult(max((abs(pair[0]) * m for pair, m in zip(self.pairs, largest, strict=True)), default=0.0))


def _stacked(pairs) -> torch.Tensor:
    """(min, max) pairs of 0-d tensors as one [pairs, 2] tensor (one read for all of them)."""
    values = [value for pair in pairs for value in pair]
    return torch.stack(values).view(-1, 2) if values else torch.empty(0, 2)


def _largest_per_term(found: torch.Tensor, terms: int) -> list[float]:
    """max |ΔWᵢ| of each term, from its (min, max) in every block (rows: block by block, term by term)."""
    per_block = found.view(-1, terms, 2).tolist() if terms else []
    return [max((max(abs(low), abs(high)) for low, high in (row[i] for row in per_block)), default=0.0)
            for i in range(terms)]  # fmt: skip


class _BlockBuffers:
    """Each worker's buffers for a block of `count` rows, as views made once: the sum in the compute
    dtype, one ΔW, and (when rows are written with pwrite) the rounded rows and their bytes."""

    def __init__(self, workspace: Workspace, columns: int, compute: torch.dtype, rounded: torch.dtype | None) -> None:
        self.workspace, self.columns, self.compute, self.rounded = workspace, columns, compute, rounded
        self._views: dict[tuple[int, int], tuple] = {}

    def get(self, worker: int, count: int) -> tuple:
        """(sum, ΔW, rounded rows or None, their bytes or None) for worker `worker`."""
        views = self._views.get((worker, count))
        if views is None:
            from ..io.tensors import tensor_bytes

            shape = (count, self.columns)
            rounded = None if self.rounded is None else self.workspace.get(f"rounded{worker}", shape, self.rounded)
            views = self._views[worker, count] = (
                self.workspace.get(f"weight{worker}", shape, self.compute),
                self.workspace.get(f"delta{worker}", shape, self.compute),
                rounded,
                None if rounded is None else tensor_bytes(rounded),
            )
        return views


def _piece(term, weight: torch.Tensor, get) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `weight` a term's piece changes, and its (unscaled) ΔW for them."""
    from ..layouts.relayout import piece_delta

    rows = term.piece.target_rows
    target = weight if rows is None else weight[rows[0] : rows[1]]

    def fetch(key: str) -> torch.Tensor:
        return get(term.adapter, key)

    def full(shape) -> torch.Tensor:
        return variant_delta(term.module, fetch, torch.Size(shape))

    return target, piece_delta(term.module, term.piece, fetch, tuple(target.shape), bias=term.bias, full_delta=full)


def _transform_in_place(term, weight: torch.Tensor, get) -> float:
    """Apply a multiplicative tuner's module to `weight`; the largest change it made."""
    new = transform(term.module, lambda key: get(term.adapter, key), weight, inverse=term.weight < 0, bias=term.bias)
    change = _largest_magnitude(new - weight) if weight.numel() else 0.0
    weight.copy_(new)
    return change


def compute_task(
    task: TensorTask,
    base: torch.Tensor,
    fetch: Fetch,
    workspace: Workspace,
    destination: torch.Tensor,
    *,
    unmerge: bool = False,
    recorded_norm: torch.Tensor | None = None,
    allow_nonfinite: bool = False,
    pool: BlockPool | None = None,
) -> TaskResult:
    """Produce one output tensor: replacements, then Σ wᵢ·ΔWᵢ (or DoRA), one rounding.

    Args:
        fetch: reads adapter `i`'s tensor `key` onto the CPU.
        workspace: buffers to compute in.
        destination: a CPU tensor of the output dtype (typically the tensor's place in the
            output file) that receives the rounded result, or, for tasks `blockwise` accepts, a
            `RowSink` that writes the rounded rows to the file.
        recorded_norm: for un-merging DoRA, the norm the merge recorded.
        pool: workers to split a plain LoRA tensor's rows across (CPU only).

    Raises:
        NonFiniteError: the result holds NaN or Inf (unless `allow_nonfinite`).
    """
    device = workspace.device
    if not unmerge:
        base = rewritten_base(task, base)  # PiSSA/OLoRA: W_res, as PEFT recomputes it on load
    if blockwise(task, base.dim(), destination.dtype, device):
        return _run_blocked(BlockedTask(task, base, fetch, workspace, destination, allow_nonfinite), pool)
    if isinstance(destination, RowSink):
        raise AssertionError(f"tensor {task.name!r} is not computed row block by row block: give a tensor")
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    weight = workspace.get("weight", task.shape, compute)
    if tuple(base.shape) == tuple(task.shape):
        weight.copy_(base, non_blocking=True)
    else:  # a resized vocabulary: the adapter's replacement fills every row below
        weight[: base.shape[0]].copy_(base, non_blocking=True)

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
        if is_transform(module):  # IA3, OFT, BOFT, HRA: W → W' (back with a negative weight: un-merge)
            max_abs = max(max_abs, _transform_in_place(term, weight, get))
            continue
        target = weight
        if term.piece is not None:  # a row block of this tensor, or of the module's ΔW (fused projections)
            target, delta = _piece(term, weight, get)
        elif term.bias:
            delta = get(term.adapter, module.bias_key)
        elif module.variant != "lora":
            delta = variant_delta(module, lambda key, i=term.adapter: get(i, key), weight.shape)
        else:
            left, right = low_rank_pair(module, get(term.adapter, module.a_key), get(term.adapter, module.b_key))
            delta = workspace.get("delta", weight.shape, compute)
            torch.mm(left, right, out=delta.view(left.shape[0], -1))
        if module.scale != 1.0:
            delta.mul_(module.scale)  # scale B·A first, as PEFT does, so w = 1 rounds exactly like PEFT
        factor = term.weight
        if module.dora and not term.bias:
            magnitude = get(term.adapter, module.magnitude_key).reshape(-1)
            if unmerge:
                norm_used = recorded_norm.to(device=device, dtype=compute)
                weight.mul_(per_output(module, norm_used / magnitude, weight)).sub_(delta)
            else:
                weight.add_(delta)
                norm_used = dora_norm(module, weight)
                weight.mul_(per_output(module, magnitude / norm_used, weight))
            factor = 1.0
        else:
            target.add_(delta, alpha=factor)
        if delta.numel():
            max_abs = max(max_abs, abs(factor) * _largest_magnitude(delta))

    destination.copy_(weight)
    rounding = rounding_error(destination, weight) if is_fp8(destination) else None
    if not allow_nonfinite:  # float8 casts saturate: check what was cast
        _check_finite(task, weight if rounding is not None else destination)
    return TaskResult(max_abs, None if norm_used is None else norm_used.float().cpu(), rounding)
