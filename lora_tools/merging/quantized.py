"""The executor hook for quantized weights: dequantize, merge, requantize (or cast), a chunk at a time.

The merge loop hands every output tensor that `adapt_plan` marked as produced
here to `QuantizedTensors.write`; the first of a weight's stored tensors to come
triggers the work. The weight is cut into chunks of whole rows of scale groups (a
row of FP8 blocks; channels; experts), read through a read-only mapping of the
base. Each chunk is dequantized, merged by the ordinary `compute_task` on that
chunk's slice of every LoRA factor, requantized with fresh scales (or cast, with
`--dtype`), a piece at a time, and its new rows written into their place in the
output file with one `pwrite`. Each of the lane's row workers takes the next chunk
as it finishes one; every chunk is computed by the same calls whichever worker
runs it, and the per-chunk error norms are summed in chunk order, so the output
and the report are the same for any number of workers. Memory: a few piece-sized
fp32 buffers per worker.

Terms whose ΔW chunk does not come from slices of the factors alone (DoRA,
biases, replacements, fused-projection pieces) are computed in one chunk spanning
the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import torch

from ..compute.extremes import extremes
from ..compute.workspace import Workspace
from ..errors import NonFiniteError
from ..io.rows import RowSink
from ..io.tensors import TORCH_DTYPES, tensor_bytes
from ..planning.merge_plan import TensorTask
from ..planning.quantized import QuantizedRoutes
from ..quant import block_rows, fp8_codec, mxfp4
from ..quant.chunks import Chunk, chunks, pieces
from ..quant.dequantize import dequantize_chunk
from ..quant.layout import QuantizedWeight
from .arithmetic import Fetch, TaskResult
from .chunk_terms import lora_pairs, merge_lora, row_local, window

__all__ = ["REQUANTIZATION_WARN_RATIO", "QuantizedTensors", "requantization_summary"]

#: Warn when ‖Q(W+ΔW) − (W+ΔW)‖ / ‖ΔW‖ of a merged tensor exceeds this: the rounding requantization adds is then
#: more than half the adapter's own change to the weight (1 is what an adapter lost entirely to rounding gives,
#: since then Q(W+ΔW) = W). Writing a plain model with --dtype bf16 keeps the whole change.
REQUANTIZATION_WARN_RATIO = 0.5

#: (task for a chunk, dequantized base values, fp32 destination, fetch, workspace) → the merge's TaskResult
Compute = Callable[[TensorTask, torch.Tensor, torch.Tensor, Fetch, Workspace], TaskResult]


@dataclass
class _Job:
    """One weight being produced: its stored inputs, where its new tensors go, and how its rows merge."""

    weight: QuantizedWeight
    logical: TensorTask
    data: torch.Tensor
    scale: torch.Tensor
    sink: RowSink  # the new data (requantized), or the weight in the --dtype: a chunk's rows at a time
    out_scale: torch.Tensor | None
    compute: Compute
    fetch: Fetch
    factors: dict | None  # every factor, read once, when the chunks are row-local
    pairs: list | None = None  # plain LoRA terms on the CPU: (weight, scale, left, right) with ΔW = scale·left·right
    tensor_scale: torch.Tensor | None = None  # fp8 per tensor: the one fresh scale
    folded: torch.Tensor | None = None  # FP8: the stored scales times 2^120 (see `fp8_codec.fold`), or None
    fused: bool = False  # FP8 blocks, plain LoRA on the CPU: rows of whole blocks go through `block_rows`


@dataclass
class _Rows:
    """What one chunk reports: the merge's results, ‖ΔW‖², ‖Q(W+ΔW) − (W+ΔW)‖², and |W+ΔW| max."""

    results: list[TaskResult] = field(default_factory=list)
    change: float = 0.0
    error: float = 0.0
    amax: float = 0.0


@dataclass
class QuantizedTensors(QuantizedRoutes):
    """Produces the output tensors `adapt_plan` routed to the quantized path, one weight at a time."""

    allow_nonfinite: bool = False
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._workspaces: dict[int, Workspace] = {}

    def write(self, task: TensorTask, base, writer, compute: Compute, fetch: Fetch, lane=None):
        """Write output tensor `task` into `writer`; returns the merge's result when this call merged the weight.

        `lane` (a merge lane: `pool`, `workspace`) runs the chunks on its row workers and device. The base's stored
        values are read through a read-only mapping and each chunk's new rows written with `pwrite` (a write
        through a shared mapping costs a page fault and a journal handle per 4 KiB page: see `io.rows`).
        """
        if task.name in self.pending:
            writer.write(task.name, tensor_bytes(self.pending.pop(task.name)))
            return None
        weight, logical = self.produced[task.name]
        keep = logical.in_dtype == "F32"  # else --dtype: the logical task reads the stored dtype (see adapt_plan)
        if task.name != (weight.data.name if keep else logical.name):
            raise AssertionError(f"{task.name}: planned before {weight.data.name}")  # adapt_plan puts the data first
        sink = writer.rows(task.name)
        with ExitStack() as stack:
            data = stack.enter_context(base.mapped(weight.data.name))
            scale = stack.enter_context(base.mapped(weight.scale.name))
            out_scale = torch.empty(weight.scale.shape, dtype=TORCH_DTYPES[weight.scale.dtype]) if keep else None
            job = _Job(weight, logical, data, scale, sink, out_scale, compute, fetch, self._factors(logical, fetch))
            on_cpu = getattr(getattr(lane, "workspace", None), "device", torch.device("cpu")).type == "cpu"
            job.pairs = lora_pairs(logical, job.factors) if on_cpu and job.factors is not None else None
            job.folded = fp8_codec.fold(scale) if weight.scheme != "mxfp4" else None
            job.fused = keep and weight.scheme == "fp8-block" and job.folded is not None and job.pairs is not None
            result = self._produce(job, lane)
        writer.written(task.name)
        if keep:  # the scales follow, in this shard or a later one
            self.pending[weight.scale.name] = out_scale
        return result

    @staticmethod
    def _factors(logical: TensorTask, fetch: Fetch) -> dict | None:
        if not logical.changed or not row_local(logical):
            return None
        keys = [(t.adapter, key) for t in logical.terms for key in (t.module.a_key, t.module.b_key)]
        return {key: fetch(*key) for key in keys}

    def _workspace(self, worker: int) -> Workspace:
        if worker not in self._workspaces:
            self._workspaces[worker] = Workspace(torch.device("cpu"))
        return self._workspaces[worker]

    def _produce(self, job: _Job, lane) -> TaskResult | None:
        parts = chunks(job.weight, whole=job.factors is None and job.logical.changed)
        keep = job.out_scale is not None
        if keep and job.weight.scheme == "fp8-tensor":  # one scale for all rows: find the merged amax first
            amax = max((rows.amax for rows in self._run(job, parts, lane, "amax")), default=0.0)
            fresh = torch.tensor(amax / fp8_codec.FP8_MAX if amax > 0 else 1.0, dtype=torch.float32)
            job.tensor_scale = fresh.to(job.out_scale.dtype)
            job.out_scale.copy_(job.tensor_scale.reshape(job.out_scale.shape))
        reports = self._run(job, parts, lane, "requantize" if keep else "cast")
        results = [result for rows in reports for result in rows.results]
        if keep and job.logical.changed:
            change = math.sqrt(sum(rows.change for rows in reports))
            if change > 0:
                error = math.sqrt(sum(rows.error for rows in reports))
                self.ratios.setdefault(job.weight.format, []).append(error / change)
        if not results:
            return None
        if len(results) == 1:
            return results[0]
        return TaskResult(max(r.max_abs_delta for r in results))

    def _run(self, job: _Job, parts: list[Chunk], lane, step: str) -> list[_Rows]:
        """`step` on every chunk, each row worker taking the next chunk as it finishes one; reports in chunk order."""

        def run(worker: int, index: int) -> _Rows:
            return self._chunk(job, parts[index], worker, lane, step)

        pool = getattr(lane, "pool", None)
        return pool.each(len(parts), run) if pool is not None else [run(0, index) for index in range(len(parts))]

    def _chunk(self, job: _Job, chunk: Chunk, worker: int, lane, step: str) -> _Rows:
        """`step` on one chunk, a piece at a time; its new rows (all pieces) then written with one `pwrite`."""
        buffers, report = self._workspace(worker), _Rows()
        rows = chunk.row_stop - chunk.row
        out = None if step == "amax" else buffers.get("quant-out", (rows, *job.sink.shape[1:]), job.sink.dtype)
        for piece in pieces(job.weight, chunk, whole=job.factors is None):
            self._piece(job, piece, None if out is None else piece.within(chunk).of(out), buffers, lane, step, report)
        if out is not None:
            job.sink.write(chunk.row, out)
        return report

    def _piece(self, job: _Job, chunk: Chunk, out, buffers: Workspace, lane, step: str, report: _Rows) -> None:
        """Dequantize, merge and requantize (or cast into `out`) one piece; its numbers added to `report`."""
        weight, logical = job.weight, job.logical
        shape = chunk.shape(weight)
        fused = step == "requantize" and job.fused and block_rows.fits(*shape, weight.block, job.pairs)
        if fused and self._fused_piece(job, chunk, out, buffers, shape, report):
            return
        base = buffers.get("quant-base", shape, torch.float32)
        dequantize_chunk(weight, job.data, job.scale, chunk, base, job.folded)
        merged = base
        scratch = buffers.get("quant-scratch", shape, torch.float32)
        if job.pairs is not None:  # one term adds into the base's values in place: a buffer less to keep in cache
            merged = base if len(job.pairs) == 1 else buffers.get("quant-merged", shape, torch.float32)
            largest, change = merge_lora(job.pairs, chunk, base, merged, scratch)
            report.results.append(TaskResult(largest))
            report.change += change
        elif logical.changed:
            merged = buffers.get("quant-merged", shape, torch.float32)
            device = getattr(lane, "workspace", None)
            workspace = device if device is not None and device.device.type != "cpu" else buffers
            fetch = job.fetch if job.factors is None else window(logical, job.factors, chunk)
            report.results.append(job.compute(replace(logical, shape=shape), base, merged, fetch, workspace))
            report.change += float(torch.linalg.vector_norm(torch.sub(merged, base, out=scratch))) ** 2
        if step == "amax":
            low, high = extremes(merged)
            report.amax = max(report.amax, -float(low), float(high))
        elif step == "cast":
            self._cast(logical, merged, out)
        else:
            spare = buffers.get("quant-spare", shape, torch.float32)
            report.error += self._checked(logical, self._requantize_chunk(job, chunk, merged, out, scratch, spare))

    def _checked(self, logical: TensorTask, error: float) -> float:
        """A piece's ‖Q(W+ΔW) − (W+ΔW)‖²; NaN or Inf there means the merged weight holds one (refused unless
        allowed)."""
        if not self.allow_nonfinite and not math.isfinite(error):
            raise NonFiniteError(f"tensor {logical.name!r}: the merged weight holds NaN or Inf")
        return error

    def _fused_piece(self, job: _Job, chunk: Chunk, out, buffers: Workspace, shape, report: _Rows) -> bool:
        """`block_rows.merge_block_row` on one piece; False (nothing done) when it leaves it to the general path."""
        index = chunk.scales(job.weight)
        spaces = [buffers.get(role, shape, torch.float32) for role in ("quant-base", "quant-scratch", "quant-spare")]
        rows, cols = slice(chunk.row, chunk.row_stop), slice(chunk.col, chunk.col_stop)
        done = block_rows.merge_block_row(
            chunk.of(job.data), job.folded[index], job.pairs[0], rows, cols, job.weight.block,
            job.out_scale.dtype, job.weight.pow2_scales, out, spaces,
        )  # fmt: skip
        if done is None:
            return False
        job.out_scale[index], largest, change, error = done
        report.results.append(TaskResult(largest))
        report.change += change
        report.error += self._checked(job.logical, error)
        return True

    @staticmethod
    def _requantize_chunk(job: _Job, chunk: Chunk, merged, out, scratch: torch.Tensor, spare: torch.Tensor) -> float:
        """Fresh stored values for a piece into `out` (and its scales) from its merged values; its
        ‖Q(W+ΔW) − (W+ΔW)‖²."""
        weight, out_scale = job.weight, job.out_scale
        index = chunk.scales(weight)
        if weight.scheme == "fp8-block":
            out_scale[index], error = fp8_codec.requantize_blocks(
                merged, weight.block, out_scale.dtype, out, scratch, spare, weight.pow2_scales
            )
        elif weight.scheme == "fp8-channel":
            scale, error = fp8_codec.requantize_scaled(merged, None, out_scale.dtype, out, scratch, spare)
            out_scale[index] = scale.reshape(out_scale[index].shape)
        elif weight.scheme == "fp8-tensor":
            _, error = fp8_codec.requantize_scaled(merged, job.tensor_scale, out_scale.dtype, out, scratch, spare)
        else:
            out[...], out_scale[index] = mxfp4.quantize(merged)
            scratch.copy_(mxfp4.dequantize(out, out_scale[index]))
            error = float(torch.linalg.vector_norm(scratch.sub_(merged))) ** 2
        return error

    def _cast(self, logical: TensorTask, values: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(values)
        if self.allow_nonfinite or not out.is_floating_point() or not out.numel():
            return
        low, high = extremes(out)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            raise NonFiniteError(
                f"tensor {logical.name!r}: the dequantized result overflows {logical.out_dtype} (try --dtype fp32)"
            )


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
