"""The streaming merge and un-merge, end to end: resolve, read, plan, write, record, rename into place.

One tensor at a time: read (on a helper thread, one ahead), compute on the chosen
device, write. Tensors no adapter touches are copied file-to-file without being
decoded. Nothing before the first computation needs torch, whose import runs while
the kernel copies the tensors that pass unchanged. The output appears atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .. import trace
from ..adapters.model import Adapter
from ..adapters.registry import fit_to_base, read_adapter
from ..compute.device import device_names
from ..errors import InvalidInputError, UnsupportedError
from ..io.card import display_name
from ..io.checkpoint import Checkpoint, open_components
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..layouts.vocab import carry_tokenizer
from ..planning.merge_plan import OUTPUT_DTYPES, MergePlan, TensorTask, plan_merge
from ..planning.quantized import QuantizedRoutes, adapt_plan
from ..planning.shards import shard_file_names
from ..quant.dequantize import DequantizedCheckpoint
from ..quant.layout import detect, planning_view
from ..quant.refuse import refuse_gguf
from ..units import Progress, parse_size
from .checks import check_adapters_finite
from .components import assign_components, copy_pipeline_files, single_file_output
from .inits import refuse_unmergeable, refuse_unrewritable
from .record import adapter_identity, recorded_dora_norms, write_folder_extras, write_merge_card, write_record
from .report import MergeReport, TensorChange, describe_terms, qualified_name
from .writer import MergeWriter, ShardTask

__all__ = ["MergeOptions", "run"]


@dataclass(frozen=True)
class MergeOptions:
    """The options `merge` and `unmerge` share; see `lora_tools.merge` for each."""

    weights: Sequence[float] | None = None
    dtype: str | None = None
    device: str = "auto"
    max_shard_size: int | str = "5GB"
    force: bool = False
    dry_run: bool = False
    alpha: float | None = None
    allow_nonfinite: bool = False
    allow_unmatched: bool = False
    checksum: bool = False
    revision: str | None = None
    token: str | None = None
    renames: Sequence[str] = ()
    residual_base: bool = False
    executor: object = "local"  # "local", "ray", or a `compute.executor.Executor`


@dataclass
class _Planned:
    """A merge's inputs, read and planned from headers alone: what to write, per pipeline component."""

    base_local: Path
    base_repo: str | None
    adapter_repos: list[str | None]
    adapters: list[Adapter]
    components: dict[str | None, Checkpoint]
    single_file: bool
    plans: dict[str | None, MergePlan]
    produced: dict[str | None, dict]
    recorded: dict
    warnings: list[str]

    @property
    def pipeline(self) -> bool:
        return None not in self.components

    @property
    def changed(self) -> list[tuple[str | None, TensorTask]]:
        return [(name, t) for name, plan in self.plans.items() for t in plan.tasks if t.changed]

    @property
    def total_bytes(self) -> int:
        return sum(plan.total_bytes for plan in self.plans.values())


def run(
    operation: str,
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    options: MergeOptions,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge (`operation="merge"`) or un-merge `adapters` into `base`, writing `output`; see `lora_tools.merge`.

    Nothing before the first computation needs torch: its import (a second or more) runs while
    the kernel copies the tensors that pass unchanged (see `MergeWriter`); a quantized base's
    executor (`merging.quantized`) is built once torch is in.
    """
    started = time.perf_counter()
    if not adapters:
        raise InvalidInputError("give at least one adapter")
    output = Path(output)
    out_dtype = None
    if options.dtype is not None:
        if options.dtype.lower() not in OUTPUT_DTYPES:
            raise InvalidInputError(f"--dtype {options.dtype!r} is not one of bf16, fp16, fp32")
        out_dtype = OUTPUT_DTYPES[options.dtype.lower()]
    weights = [1.0] * len(adapters) if not options.weights else [float(w) for w in options.weights]
    planned = _plan(operation, base, adapters, output, options, weights, out_dtype)
    changed = planned.changed
    report_args = dict(
        operation=operation,
        base=str(base),
        adapters=[str(p) for p in adapters],
        weights=weights,
        output=str(output),
        dry_run=options.dry_run,
        warnings=planned.warnings,
        tensors_changed=len(changed),
        tensors_copied=sum(len(p.tasks) for p in planned.plans.values()) - len(changed),
        bytes_written=planned.total_bytes,
    )
    if options.dry_run:
        from ..compute.device import resolve_devices

        devices = resolve_devices(options.device)
        check_adapters_finite(planned.adapters)
        files = [output.name] if planned.single_file else [
            qualified_name(name, file) for name, plan in planned.plans.items()
            for file in shard_file_names(len(plan.shards), planned.components[name].weight_prefix)
        ]  # fmt: skip
        changes = [
            TensorChange(qualified_name(name, t.name), describe_terms(t, planned.adapters)) for name, t in changed
        ]
        return MergeReport(
            **report_args, device=device_names(devices), seconds=time.perf_counter() - started, files=files,
            changes=changes,
        )  # fmt: skip
    written = _write(operation, base, adapters, output, options, weights, out_dtype, planned, progress)
    return MergeReport(**report_args, **written, seconds=time.perf_counter() - started)


def _plan(
    operation: str, base: str | os.PathLike, adapter_paths: Sequence, output: Path, options: MergeOptions,
    weights: list[float], out_dtype: str | None,
) -> _Planned:  # fmt: skip
    """Resolve and read the inputs, and plan every component's output (headers only, no torch)."""
    shard_bytes = parse_size(options.max_shard_size)
    base_local, base_repo = resolve_input(base, revision=options.revision, token=options.token)
    adapter_inputs = [resolve_input(p, revision=options.revision, token=options.token) for p in adapter_paths]
    adapters = [fit_to_base(read_adapter(local, alpha=options.alpha), base_local) for local, _ in adapter_inputs]
    adapters = refuse_unmergeable(adapters, operation, options.residual_base)  # aLoRA, inits that rewrote the base
    refuse_gguf(base_local)
    components = open_components(base_local)
    layouts = {name: detect(c.path, c.tensors, c.config) for name, c in components.items()}
    if None in components:  # in-memory names (VLM prefixes, fused experts) → the checkpoint's own
        from ..planning.disk_names import adapters_on_disk

        on_disk = DequantizedCheckpoint(components[None], layouts[None]) if layouts[None] else components[None]
        adapters = adapters_on_disk(adapters, on_disk, options.renames)  # quantized experts: their logical fp32 view
    single_file, carried_not = single_file_output(output, components)
    parts, left_out = assign_components(adapters, components, options.allow_unmatched)
    shard_size = (1 << 62) if single_file else shard_bytes
    plans = {
        name: plan_merge(
            planning_view(checkpoint.tensors, layouts[name]),
            checkpoint.config,
            parts[name],
            weights,
            output_dtype=out_dtype,
            max_shard_size=shard_size,
            unmerge=operation == "unmerge",
            allow_unmatched=options.allow_unmatched,
        )
        for name, checkpoint in components.items()
    }
    adapted = {n: adapt_plan(p, layouts[n], out_dtype, shard_size) for n, p in plans.items()}
    plans = {name: plan for name, (plan, _) in adapted.items()}
    refuse_unrewritable(adapters, plans)  # PiSSA/OLoRA onto base tensors PEFT could not have rewritten
    recorded = recorded_dora_norms(base_local, adapters, plans) if operation == "unmerge" else {}
    warnings = left_out + carried_not + [w for plan in plans.values() for w in plan.warnings]
    return _Planned(
        base_local, base_repo, [repo for _, repo in adapter_inputs], adapters, components, single_file, plans,
        {n: produced for n, (_, produced) in adapted.items()}, recorded, warnings,
    )  # fmt: skip


def _write(
    operation: str, base: str | os.PathLike, adapter_paths: Sequence, output: Path, options: MergeOptions,
    weights: list[float], out_dtype: str | None, planned: _Planned, progress: Progress | None,
) -> dict:  # fmt: skip
    """Write the planned output into a temporary sibling, record it, and rename it into place.

    Returns the report fields the writing decides (device, files, changes, checksums, quantization).
    """
    done_bytes, total = 0, planned.total_bytes

    def advance(nbytes: int) -> None:
        nonlocal done_bytes
        done_bytes += nbytes
        if progress is not None:
            progress(done_bytes, total)

    trace.mark("planned")
    unmerge, single_file, components = operation == "unmerge", planned.single_file, planned.components
    writing = MergeWriter(planned.adapters, unmerge, options.allow_nonfinite, planned.recorded, advance)
    if any(planned.produced.values()):  # routes now, the executor once torch is in (`start`)
        writing.quant = {n: QuantizedRoutes(produced) for n, produced in planned.produced.items() if produced}
    inputs = [planned.base_local, *(a.path for a in planned.adapters)]
    with (
        atomic_output(
            output, is_dir=not single_file, force=options.force, inputs=inputs, estimated_bytes=total
        ) as target,
        closing(writing),
    ):
        if getattr(options.executor, "name", options.executor) != "local":  # "ray", or a ready-made executor
            written, devices, ran = _write_shards(writing, planned, target, options)
        else:
            (written, devices), ran = _write_here(writing, planned, target, options), None
        files: list[str] = []
        for name in components:
            files += [output.name] if single_file else [qualified_name(name, f) for f in written[name]]
        if not single_file:
            _write_extras(
                operation, base, adapter_paths, target, options, weights, out_dtype, planned, written, writing
            )
        quantization, requantized = requantization(writing.quant)
        planned.warnings += requantized
        digests = checksums(target) if options.checksum else None
        if digests is not None and single_file:
            digests = {output.name: digests[target.name]}
        trace.mark("output complete")
    trace.mark("renamed into place")
    return dict(
        device=device_names(devices), files=files, changes=writing.changes, checksums=digests, quantization=quantization,
        executor=ran.name if ran else "local", nodes=ran.nodes if ran else 1,
    )  # fmt: skip


def _write_here(writing: MergeWriter, planned: _Planned, target: Path, options: MergeOptions) -> tuple[dict, list]:
    """Write every shard in this process (copies on a helper thread, compute on every core); (names, devices)."""
    written: dict[str | None, list[str]] = {}
    for name, checkpoint in planned.components.items():
        folder = target / name if name else target
        if name:
            folder.mkdir()
        written[name] = writing.prepare(
            checkpoint, planned.plans[name], target if planned.single_file else folder, planned.single_file, name
        )
    if not planned.single_file:  # the record names the adapters by digest: hashed after the copies, off the main thread
        writing.checks += [writing.copier.submit(adapter_identity, a) for a in planned.adapters]
    trace.mark("copies queued")
    devices = writing.start(options.device)
    trace.mark("ready to compute")
    writing.run()
    return written, devices


def _write_shards(writing: MergeWriter, planned: _Planned, target: Path, options: MergeOptions):
    """Write every shard as a task of `options.executor` (`ShardTask`), in shard order; (names, devices, executor).

    The tasks write into `target`; the executor is left (every task stopped) before `atomic_output` may remove it.
    """
    from ..compute.device import resolve_devices
    from ..compute.executor import executor_for

    if any(planned.produced.values()):
        raise UnsupportedError("--executor ray does not merge into quantized bases yet; leave out --executor ray")
    devices = resolve_devices(options.device)
    written, shards = {}, []
    for name, checkpoint in planned.components.items():
        if name:
            (target / name).mkdir()
        plan = planned.plans[name]
        written[name] = (
            [target.name] if planned.single_file else shard_file_names(len(plan.shards), checkpoint.weight_prefix)
        )
        shards += [(name, index, sum(plan.tasks[i].nbytes for i in shard)) for index, shard in enumerate(plan.shards)]
    task = ShardTask(
        planned.adapters, writing.unmerge, writing.allow_nonfinite, planned.recorded, planned.components, planned.plans,
        target, planned.single_file, devices[0].type,  # each task resolves it on its node
    )  # fmt: skip
    with executor_for(options.executor, devices) as pool:
        results = pool.map(lambda shard, workspace: task(shard[:2], workspace), shards, size=lambda shard: shard[2])
        for (_, _, nbytes), (changes, norms) in zip(shards, results, strict=True):
            writing.changes += changes
            writing.norms.update(norms)
            writing.advance(nbytes)
    if not planned.single_file:
        for adapter in planned.adapters:
            adapter_identity(adapter)
    return written, devices, pool


def _write_extras(
    operation: str, base: str | os.PathLike, adapter_paths: Sequence, target: Path, options: MergeOptions,
    weights: list[float], out_dtype: str | None, planned: _Planned, written: dict, writing: MergeWriter,
) -> None:  # fmt: skip
    """Beside a folder output's weights: index, config and the base's other files, tokenizer, record and card."""
    for name, checkpoint in planned.components.items():
        folder = target / name if name else target
        write_folder_extras(folder, checkpoint, planned.plans[name], written[name], out_dtype)
        if planned.plans[name].vocab_size is not None:  # the tokenizer that knows the new tokens
            carry_tokenizer([a.path for a in planned.adapters], folder)
    if planned.pipeline:
        copy_pipeline_files(planned.base_local, target, planned.components)
    base_name = display_name(base, planned.base_repo)
    adapter_names = [display_name(p, repo) for p, repo in zip(adapter_paths, planned.adapter_repos, strict=True)]
    write_record(target, operation, base_name, planned.adapters, adapter_names, weights, out_dtype, writing.norms)
    config = planned.components[next(iter(planned.components))].config if not planned.pipeline else None
    write_merge_card(target, operation, config, base_name, planned.base_repo, adapter_names, weights, options.dtype)


def requantization(quantized: dict) -> tuple[dict, list[str]]:
    """The requantization error report of a quantized merge (nothing for a plain one)."""
    if not quantized:
        return {}, []
    from .quantized import requantization_summary

    return requantization_summary(quantized.values())
