"""Streaming merge and un-merge of LoRA adapters into checkpoints.

One tensor at a time: read (on a helper thread, one ahead), compute on the
chosen device, write (on a second helper thread). Tensors no adapter touches
are copied file-to-file without being decoded. The output appears atomically.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__, quant, trace
from .adapters.reading import Adapter, read_adapter
from .errors import IncompatibleError, InvalidInputError, OutputNameError, UnsupportedError
from .io.card import CARD_NAME, display_name, write_card
from .io.checkpoint import RECORD_PREFIX, Checkpoint, component_aliases, open_components, read_json
from .io.hub import resolve_input
from .io.output import atomic_output, checksums
from .io.safetensors_io import SafetensorsWriter
from .plan import OUTPUT_DTYPES, MergePlan, TensorTask, plan_merge, shard_file_names
from .serving import fit_to_base
from .units import parse_size

__all__ = ["merge", "unmerge", "MergeReport", "TensorChange", "RECORD_NAME", "DORA_NORMS_NAME"]

RECORD_NAME = f"{RECORD_PREFIX}.json"
DORA_NORMS_NAME = f"{RECORD_PREFIX}.dora.safetensors"
Progress = Callable[[int, int], None]


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

    @property
    def max_abs_delta(self) -> float:
        return max((c.max_abs_delta or 0.0 for c in self.changes), default=0.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_delta": self.max_abs_delta}


def _describe(task: TensorTask, adapters: Sequence[Adapter]) -> list[dict]:
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


def _sha256(path: Path) -> str:
    status = os.stat(path)
    return _sha256_of(Path(path).resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    """A file's sha256, remembered for as long as its size and mtime stay (a merge hashes its adapters on
    the copy thread, early, and reads the digests when it writes its record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _adapter_identity(adapter: Adapter) -> str:
    """A stable id for an adapter: the sha256 of its weight files (no host paths)."""
    return _sha256(adapter.weights.files[0])


def _updated_config(config: dict, plan: MergePlan, dtype: str | None) -> dict:
    config = dict(config)
    if plan.untie_embeddings:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    if plan.vocab_size is not None:  # the adapter brought new tokens
        config["vocab_size"] = plan.vocab_size
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "vocab_size": plan.vocab_size}
    if dtype is not None:
        config.pop("quantization_config", None)  # quantized weights were written dequantized
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    return config


def _run(
    operation: str,
    base_path: str | os.PathLike,
    adapter_paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None,
    dtype: str | None,
    device: str,
    max_shard_size: int | str,
    force: bool,
    dry_run: bool,
    alpha: float | None,
    allow_nonfinite: bool,
    allow_unmatched: bool,
    checksum: bool,
    revision: str | None,
    token: str | None,
    progress: Progress | None,
    renames: Sequence[str] = (),
) -> MergeReport:

    # Nothing before the first computation needs torch: its import (a second or more) runs while
    # the kernel copies the tensors that pass unchanged (see `_Writing`); a quantized base's executor
    # (lora_tools.quant.execute) is built once torch is in.
    started = time.perf_counter()
    if not adapter_paths:
        raise InvalidInputError("give at least one adapter")
    output = Path(output)
    unmerge = operation == "unmerge"
    out_dtype = None
    if dtype is not None:
        if dtype.lower() not in OUTPUT_DTYPES:
            raise InvalidInputError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32")
        out_dtype = OUTPUT_DTYPES[dtype.lower()]
    weights = [1.0] * len(adapter_paths) if not weights else [float(w) for w in weights]
    shard_bytes = parse_size(max_shard_size)

    base_local, base_repo = resolve_input(base_path, revision=revision, token=token)
    adapter_inputs = [resolve_input(p, revision=revision, token=token) for p in adapter_paths]
    adapters = [fit_to_base(read_adapter(local, alpha=alpha), base_local) for local, _ in adapter_inputs]
    quant.refuse_gguf(base_local)
    components = open_components(base_local)
    layouts = {name: quant.detect(c.path, c.tensors, c.config) for name, c in components.items()}
    pipeline = None not in components
    if not pipeline:  # in-memory names (VLM prefixes, fused experts) → the checkpoint's own
        from .layouts.disk_names import adapters_on_disk

        on_disk = quant.DequantizedCheckpoint(components[None], layouts[None]) if layouts[None] else components[None]
        adapters = adapters_on_disk(adapters, on_disk, renames)  # quantized experts: their logical fp32 view
    single_file, carried_not = _single_file_output(output, components)
    parts, left_out = _assign_components(adapters, components, allow_unmatched)
    plans = {
        name: plan_merge(
            quant.planning_view(checkpoint.tensors, layouts[name]),
            checkpoint.config,
            parts[name],
            weights,
            output_dtype=out_dtype,
            max_shard_size=(1 << 62) if single_file else shard_bytes,
            unmerge=unmerge,
            allow_unmatched=allow_unmatched,
        )
        for name, checkpoint in components.items()
    }
    adapted = {
        n: quant.adapt_plan(p, layouts[n], out_dtype, (1 << 62) if single_file else shard_bytes)
        for n, p in plans.items()
    }
    plans = {name: plan for name, (plan, _) in adapted.items()}
    recorded = _recorded_dora_norms(base_local, adapters, plans) if unmerge else {}
    report_args = dict(
        operation=operation,
        base=str(base_path),
        adapters=[str(p) for p in adapter_paths],
        weights=weights,
        output=str(output),
        dry_run=dry_run,
        warnings=left_out + carried_not + [w for plan in plans.values() for w in plan.warnings],
    )
    changed = [(name, t) for name, plan in plans.items() for t in plan.tasks if t.changed]
    total = sum(plan.total_bytes for plan in plans.values())
    counted = dict(
        tensors_changed=len(changed), tensors_copied=sum(len(p.tasks) for p in plans.values()) - len(changed)
    )
    if dry_run:
        from .device import resolve_devices

        devices = resolve_devices(device)
        _check_adapters_finite(adapters)
        files = [output.name] if single_file else [
            _qualified(name, file) for name, plan in plans.items()
            for file in shard_file_names(len(plan.shards), components[name].weight_prefix)
        ]  # fmt: skip
        return MergeReport(
            **report_args, device=_device_names(devices), **counted, bytes_written=total, seconds=time.perf_counter() - started, files=files,
            changes=[TensorChange(_qualified(name, t.name), _describe(t, adapters)) for name, t in changed],
        )  # fmt: skip

    done_bytes = 0

    def advance(nbytes: int) -> None:
        nonlocal done_bytes
        done_bytes += nbytes
        if progress is not None:
            progress(done_bytes, total)

    trace.mark("planned")
    writing = _Writing(adapters, unmerge, allow_nonfinite, recorded, advance)
    if any(produced for _, produced in adapted.values()):  # routes now, the executor once torch is in (`start`)
        from .quant.routes import QuantizedRoutes

        writing.quant = {n: QuantizedRoutes(produced) for n, (_, produced) in adapted.items() if produced}
    inputs = [base_local, *(a.path for a in adapters)]
    with (
        atomic_output(output, is_dir=not single_file, force=force, inputs=inputs, estimated_bytes=total) as target,
        closing(writing),
    ):
        written: dict[str | None, list[str]] = {}
        for name, checkpoint in components.items():
            folder = target / name if name else target
            if name:
                folder.mkdir()
            written[name] = writing.prepare(
                checkpoint, plans[name], target if single_file else folder, single_file, name
            )
        if not single_file:  # the record names the adapters by digest: hashed after the copies, off the main thread
            writing.checks += [writing.copier.submit(_adapter_identity, a) for a in adapters]
        trace.mark("copies queued")
        devices = writing.start(device)
        trace.mark("ready to compute")
        writing.run()
        files: list[str] = []
        for name, checkpoint in components.items():
            files += [output.name] if single_file else [_qualified(name, f) for f in written[name]]
            if not single_file:
                folder = target / name if name else target
                _write_folder_extras(folder, checkpoint, plans[name], written[name], out_dtype)
                if plans[name].vocab_size is not None:  # the tokenizer that knows the new tokens
                    from .layouts.vocab import carry_tokenizer

                    carry_tokenizer([a.path for a in adapters], folder)
        if pipeline:
            _copy_pipeline_files(base_local, target, components)
        if not single_file:
            base_name = display_name(base_path, base_repo)
            adapter_names = [display_name(p, repo) for p, (_, repo) in zip(adapter_paths, adapter_inputs, strict=True)]
            _write_record(target, operation, base_name, adapters, adapter_names, weights, out_dtype, writing.norms)
            config = components[next(iter(components))].config if not pipeline else None
            _write_merge_card(target, operation, config, base_name, base_repo, adapter_names, weights, dtype)
        quantization, requantized = _requantization(writing.quant)
        report_args["warnings"] += requantized
        digests = checksums(target) if checksum else None
        if digests is not None and single_file:
            digests = {output.name: digests[target.name]}
        trace.mark("output complete")
    trace.mark("renamed into place")
    return MergeReport(
        **report_args,
        device=_device_names(devices),
        **counted,
        bytes_written=total,
        seconds=time.perf_counter() - started,
        files=files,
        changes=writing.changes,
        checksums=digests,
        quantization=quantization,
    )


def _single_file_output(output: Path, components: dict) -> tuple[bool, list[str]]:
    """Whether OUT is one `.safetensors` file (every tensor of the base in it), and what that leaves behind."""
    if output.suffix != ".safetensors":
        return False, []
    if None not in components:
        raise OutputNameError(
            f"output {output} is one file, but a pipeline has several components ({', '.join(components)}); "
            "give a folder as --output"
        )
    folder = components[None].folder
    if folder is None:
        return True, []
    return True, [
        f"{output} is a single .safetensors file: config.json, tokenizer and other files of {folder} are not "
        "carried (and no merge record is kept); give a folder as --output to keep them"
    ]


def _device_names(devices: list) -> str:
    return ",".join(str(d) for d in devices)


def _requantization(quantized: dict) -> tuple[dict, list[str]]:
    """The requantization error report of a quantized merge (nothing for a plain one)."""
    if not quantized:
        return {}, []
    from .quant.execute import requantization_summary

    return requantization_summary(quantized.values())


def _qualified(component: str | None, name: str) -> str:
    return f"{component}/{name}" if component else name


def _assign_components(
    adapters: Sequence[Adapter], components: dict[str | None, Checkpoint], allow_unmatched: bool
) -> tuple[dict[str | None, list[Adapter]], list[str]]:
    """Split each adapter by the pipeline component its modules target (all of it for a lone checkpoint).

    Returns the parts by component, and warnings for what `allow_unmatched` left out.
    """
    if None in components:
        return {None: list(adapters)}, []
    aliases = component_aliases(components)
    parts: dict[str | None, list[Adapter]] = {name: [] for name in components}
    problems, warnings = [], []
    for adapter in adapters:
        problems += [f"{adapter.path}: {key}: not a key lora_tools understands" for key in adapter.unknown_keys]
        wanted = {aliases.get(c, c) for c in adapter.components}
        if None in wanted:
            problems.append(
                f"{adapter.path}: some modules name no pipeline component (no unet./text_encoder. or lora_unet_/lora_te_ "
                "prefix); point BASE at the component's folder instead"
            )
        missing = sorted(c for c in wanted - set(components) if c is not None)
        if missing and not allow_unmatched:
            problems.append(f"{adapter.path}: targets {', '.join(missing)}, which the pipeline does not have")
        elif missing:
            count = sum(1 for m in adapter.modules if aliases.get(m.component, m.component) in missing)
            warnings.append(
                f"{adapter.path}: {count} modules for {', '.join(missing)} were left out (--allow-unmatched)"
            )
        for name in components:
            parts[name].append(adapter.restricted(*(c for c in adapter.components if aliases.get(c, c) == name)))
    if problems:
        raise IncompatibleError("the adapters do not fit the pipeline", problems)
    return parts, warnings


def _copy_pipeline_files(base: Path, target: Path, components: dict) -> None:
    """Everything of a pipeline folder outside the merged components (model_index.json, scheduler, tokenizer, …)."""
    for source in sorted(base.rglob("*")):
        relative = source.relative_to(base)
        if not source.is_file() or relative.parts[0] in components or relative.parts[0].startswith("."):
            continue
        if relative == Path(CARD_NAME) or relative.name.startswith(RECORD_PREFIX):
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


@dataclass
class _Shard:
    """One output file being written: its copies in flight and the tensors left to compute."""

    base: Checkpoint
    component: str | None
    writer: SafetensorsWriter
    copies: list = field(default_factory=list)  # (task, future): bytes that come through unchanged
    quantized: list = field(default_factory=list)  # tasks of quantized weights (and their scales)
    computed: list = field(default_factory=list)  # tasks of tensors to compute


class _Writing:
    """Streams planned checkpoints to disk: copy what does not change, compute what does.

    `prepare` (no torch) creates the output files and starts kernel copies of the tensors
    that pass unchanged on a helper thread. `start` then imports torch while those copies
    run. `run` computes each changed tensor from a read-only mapping of the base and writes
    its rows into their place in the output with `pwrite`, the row blocks dealt to the
    cores one at a time (or the tensors to several devices), and `finish` checks and
    closes every file.
    """

    def __init__(self, adapters, unmerge: bool, allow_nonfinite: bool, recorded: dict, advance):
        self.adapters, self.unmerge, self.allow_nonfinite = adapters, unmerge, allow_nonfinite
        self.recorded, self._advance = recorded, advance
        self._progress_lock = threading.Lock()
        self.checks: list = []
        self.changes: list[TensorChange] = []
        self.quant: dict = {}  # component → quant.routes.QuantizedRoutes, then quant.execute.QuantizedTensors
        self.norms: dict = {}
        self.shards: list[_Shard] = []
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="loratool-copy")
        self.lanes: list = []
        self._threads = ExitStack()

    def close(self) -> None:
        self.copier.shutdown(wait=True, cancel_futures=True)
        for lane in self.lanes:
            lane.close()
        self._threads.close()

    def advance(self, nbytes: int) -> None:
        with self._progress_lock:  # several device lanes may report at once
            self._advance(nbytes)

    def fetch(self, index: int, key: str):
        return self.adapters[index].read(key)

    def prepare(self, base: Checkpoint, plan: MergePlan, target: Path, single_file: bool, component: str | None):
        """Create one checkpoint's shard files in `target` (a folder, or the file itself) and start their copies.

        Returns the shard file names.
        """
        names = [target.name] if single_file else shard_file_names(len(plan.shards), base.weight_prefix)
        paths = [target] if single_file else [target / n for n in names]
        quantized = self.quant.get(component)
        for shard, path in zip(plan.shards, paths, strict=True):
            tasks = [plan.tasks[i] for i in shard]
            writer = SafetensorsWriter(path, [(t.name, t.out_dtype, t.shape) for t in tasks], {"format": "pt"})
            job = _Shard(base, component, writer)
            self.shards.append(job)
            if quantized is not None:  # dequantize → merge → requantize, after torch is imported (see `run`)
                job.quantized = [t for t in tasks if quantized.handles(t.name)]
                tasks = [t for t in tasks if not quantized.handles(t.name)]
            job.computed = [task for task in tasks if _needs_compute(task, base)]
            for task in tasks:
                if not _needs_compute(task, base):
                    job.copies.append((task, self.copier.submit(_copy, writer, task.name, base.tensors[task.source])))
        return names

    def start(self, device: str):
        """Import torch, resolve the device(s) and check what must be checked before computing; return the devices."""
        from .compute.pool import single_threaded_torch, usable_cores

        with trace.span("import torch"):
            self._threads.enter_context(single_threaded_torch())  # from here on, our own pools use the cores
        from .device import resolve_devices
        from .io.tensors import return_freed_memory_to_os

        return_freed_memory_to_os()
        if self.quant:
            from .quant.execute import QuantizedTensors

            self.quant = {n: QuantizedTensors(r.produced, self.allow_nonfinite) for n, r in self.quant.items()}
        devices = resolve_devices(device)
        _check_adapters_finite(self.adapters)
        if not self.allow_nonfinite:  # copied tensors are checked from their source while the compute runs
            for job in self.shards:
                for task, _ in job.copies:
                    self.checks.append(self.copier.submit(_checked_alone, job.base.tensors[task.source]))
        self.lanes = [_Lane(d, usable_cores() if len(devices) == 1 else 1) for d in devices]
        return devices

    def run(self) -> None:
        """Compute every changed tensor, on one device or dealt to several, then finish the files."""
        work = [(job, task) for job in self.shards for task in job.computed]
        with _no_cyclic_gc():
            if len(self.lanes) == 1:
                results = self._compute_in_turn(self.lanes[0], work)
            else:
                results = _deal(self.lanes, work, self._compute)
        for (job, task), result in zip(work, results, strict=True):
            qualified = _qualified(job.component, task.name)
            if task.changed:
                change = TensorChange(
                    qualified, _describe(task, self.adapters), result.max_abs_delta, result.rounding_error
                )
                self.changes.append(change)
            if result.dora_norm is not None and not self.unmerge:
                self.norms[qualified] = result.dora_norm
        for job in self.shards:
            self._write_quantized(job)
        with trace.span("wait for copies and checks"):
            for job in self.shards:
                for task, future in job.copies:
                    future.result()
                    self.advance(task.nbytes)
            for check in self.checks:
                check.result()
        with trace.span("close files"):
            for job in self.shards:
                job.writer.close()

    def _compute_in_turn(self, lane, work: list) -> list:
        """Compute the tensors in order on one device; on the CPU, each tensor's blocks start on the helper
        threads before the last tensor is finished, and the next tensor is opened while they run.

        Per tensor, the calling thread opens it (mapping, sink, factors) and starts its blocks, finishes
        the one before (waits for its blocks, checks it, unmaps it), then joins in the blocks: that work,
        about a millisecond per tensor, no longer leaves the helpers idle. At most two tensors are open.
        """
        ahead = [*work[1:], None][: len(work)]  # nothing to compute: nothing ahead
        results: list = []
        open_tensors: deque[_Open] = deque()
        try:
            for (job, task), upcoming in zip(work, ahead, strict=True):
                opened = self._open(lane, job, task, upcoming, open_tensors[-1] if open_tensors else None)
                open_tensors.append(opened)
                if len(open_tensors) > 1:
                    results.append(open_tensors.popleft().finish())
                opened.help()
            while open_tensors:
                results.append(open_tensors.popleft().finish())
        except BaseException:
            for opened in open_tensors:
                opened.abandon()
            raise
        return results

    def _compute(self, lane, job: _Shard, task: TensorTask, upcoming):
        """Compute one tensor into its place in the output; `upcoming` (job, task) is staged or prefetched meanwhile."""
        opened = self._open(lane, job, task, upcoming, None)
        try:
            opened.help()
        except BaseException:
            opened.abandon()
            raise
        return opened.finish()

    def _open(self, lane, job: _Shard, task: TensorTask, upcoming, before: _Open | None) -> _Open:
        """Open one tensor's input and output and start computing it (see `_Open`): on the CPU, a plain
        LoRA tensor's blocks start on the helpers (after `before`'s); any other tensor is computed here."""
        from .io.tensors import to_torch_dtype
        from .ops import BlockedTask, blockwise, compute_task

        qualified = _qualified(job.component, task.name)
        stack = ExitStack()
        try:
            opened = _Open(self, job, task, stack)
            staged = lane.take(job.base, task.source) if lane.stager is not None else None
            if upcoming is not None and lane.stager is not None:
                lane.stage_ahead(upcoming[0].base, upcoming[1].source)
            elif upcoming is not None:
                upcoming[0].base.prefetch(upcoming[1].source)
            tensor = staged if staged is not None else stack.enter_context(job.base.mapped(task.source))
            if blockwise(task, tensor.dim(), to_torch_dtype(task.out_dtype), lane.workspace.device):
                destination = job.writer.rows(task.name)  # rounded rows written with pwrite, block by block
                blocked = BlockedTask(task, tensor, self.fetch, lane.workspace, destination, self.allow_nonfinite)
                after = before.batch if before is not None else None
                opened.blocked = blocked
                opened.batch = lane.pool.start(blocked.count, blocked.run, after)  # a CPU lane has a pool
                return opened
            destination = stack.enter_context(job.writer.mapped(task.name))
            with trace.span("compute", task.name):
                opened.result = compute_task(
                    task, tensor, self.fetch, lane.workspace, destination, unmerge=self.unmerge,
                    recorded_norm=self.recorded.get(qualified), allow_nonfinite=self.allow_nonfinite, pool=lane.pool,
                )  # fmt: skip
            return opened
        except BaseException:
            stack.close()
            raise

    def _write_quantized(self, job: _Shard) -> None:
        """Write a shard's quantized weights: dequantize, merge, requantize (or cast), one weight at a time."""
        from .ops import compute_task

        if not job.quantized:
            return
        quantized = self.quant[job.component]

        def compute(logical: TensorTask, values, destination, fetch, workspace):  # a chunk of the weight's rows
            recorded = self.recorded.get(_qualified(job.component, logical.name))
            return compute_task(logical, values, fetch, workspace, destination, unmerge=self.unmerge,
                                recorded_norm=recorded, allow_nonfinite=self.allow_nonfinite)  # fmt: skip

        for task in job.quantized:
            result = quantized.write(task, job.base, job.writer, compute, self.fetch, self.lanes[0])
            if result is not None:
                logical = quantized.produced[task.name][1]
                qualified = _qualified(job.component, task.name)
                self.changes.append(TensorChange(qualified, _describe(task, self.adapters), result.max_abs_delta))
                if result.dora_norm is not None and not self.unmerge:
                    self.norms[_qualified(job.component, logical.name)] = result.dora_norm
            self.advance(task.nbytes)


class _Open:
    """One tensor being computed (`_Writing._open`): its mapping and output place stay open until `finish`.

    A blockwise tensor's blocks run on the pool's helpers (`batch`, started when opened) and on the
    calling thread (`help`); `finish` waits for them, checks the result and closes the tensor.
    `abandon` stops it after an error elsewhere, once no block of it runs.
    """

    def __init__(self, writing: _Writing, job: _Shard, task: TensorTask, stack: ExitStack) -> None:
        self.writing, self.job, self.task, self.stack = writing, job, task, stack
        self.blocked = self.batch = self.result = None
        self.started = time.perf_counter(), time.thread_time()

    def help(self) -> None:
        """Compute blocks on the calling thread until none is left to take."""
        if self.batch is not None:
            self.batch.help()

    def finish(self):
        """Wait for the tensor's blocks, check it and close it; its `TaskResult`."""
        with self.stack:
            if self.batch is not None:
                self.batch.wait()
            if self.blocked is not None:
                self.result = self.blocked.finish()
                trace.ended("compute", self.task.name, self.started)
        self.job.writer.written(self.task.name)
        self.writing.advance(self.task.nbytes)
        return self.result

    def abandon(self) -> None:
        """After an error: no further block starts; once the running ones end, the tensor is closed."""
        with self.stack:
            if self.batch is not None:
                self.batch.stop()
                with suppress(BaseException):  # the error being raised is the one to report
                    self.batch.wait()


class _Lane:
    """One compute device: its buffers, its row pool (CPU) or its staging pipeline (CUDA)."""

    def __init__(self, device, workers: int) -> None:
        from .compute.pool import BlockPool
        from .compute.streams import Stager, streams_for
        from .ops import Workspace

        self.device = device
        self.workspace = Workspace(device)
        streams = streams_for(device)
        self.stager = Stager(streams) if streams is not None else None
        self.pool = BlockPool(workers) if device.type == "cpu" else None
        self._staged: dict = {}

    def take(self, base: Checkpoint, name: str):
        """The tensor `name`, staged on this device (the first call stages it; later ones were staged ahead)."""
        staged = self._staged.pop((id(base), name), None) or self.stager.stage(lambda: base.mapped(name))
        return self.stager.take(staged)

    def stage_ahead(self, base: Checkpoint, name: str) -> None:
        if self.stager is not None and (id(base), name) not in self._staged:  # names repeat across components
            self._staged[id(base), name] = self.stager.stage(lambda: base.mapped(name))

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        if self.pool is not None:
            self.pool.close()


def _deal(lanes: list, work: list, compute) -> list:
    """Deal tasks to lanes largest first (each to the least loaded), run the lanes at once; results in task order."""
    load = [0] * len(lanes)
    assigned: list[list[int]] = [[] for _ in lanes]
    for index in sorted(range(len(work)), key=lambda i: (-work[i][1].nbytes, i)):
        lane = min(range(len(lanes)), key=lambda k: (load[k], k))
        assigned[lane].append(index)
        load[lane] += work[index][1].nbytes
    results: list = [None] * len(work)

    def run_lane(number: int) -> None:
        if lanes[number].device.type == "cuda":
            import torch

            torch.cuda.set_device(lanes[number].device)  # this thread's current stream is on its device
        mine = sorted(assigned[number])
        for position, index in enumerate(mine):
            upcoming = work[mine[position + 1]] if position + 1 < len(mine) else None
            results[index] = compute(lanes[number], *work[index], upcoming)

    from .compute.pool import one_torch_thread, wait_all

    with ThreadPoolExecutor(len(lanes), thread_name_prefix="loratool-device", initializer=one_torch_thread) as executor:
        wait_all([executor.submit(run_lane, number) for number in range(len(lanes))])
    return results


@contextmanager
def _no_cyclic_gc():
    """No cyclic garbage collection while streaming: tensors are freed by reference counting, and each
    collection would walk the millions of objects importing torch created (a tenth of the CPU time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _checked_alone(info) -> None:
    """`_refuse_nonfinite` on a helper thread, with one torch thread and the lowest priority (the compute
    has the cores)."""
    from .compute.pool import one_torch_thread, yield_to_compute

    one_torch_thread()
    yield_to_compute()
    with trace.span("nonfinite check", info.name):
        _refuse_nonfinite(info)


def _copy(writer: SafetensorsWriter, name: str, info) -> None:
    with trace.span("copy", name):
        writer.copy_from(name, info)


def _refuse_nonfinite(info) -> None:
    """Refuse a base tensor holding NaN/Inf: copied untouched, it would reach the output."""
    from .errors import NonFiniteError

    bad = _count_nonfinite(info) if info.is_float else 0
    if bad:
        raise NonFiniteError(
            f"{info.file}: base tensor {info.name!r} holds {bad} NaN/Inf value(s), which would reach the output "
            "(pass --allow-nonfinite if the model really contains them)"
        )


_CHECK_CHUNK_BYTES = 16 << 20


def _count_nonfinite(info) -> int:
    """NaN/Inf values in a stored tensor, read through small mappings (min/max first, which NaN and Inf reach)."""
    import torch

    from .io.safetensors_io import DTYPE_SIZES
    from .io.tensors import mapped_tensor

    itemsize = DTYPE_SIZES[info.dtype]
    step = _CHECK_CHUNK_BYTES // itemsize
    bad = 0
    for start in range(0, info.numel, step):
        count = min(step, info.numel - start)
        with mapped_tensor(info.file, info.offset + start * itemsize, info.dtype, (count,)) as chunk:
            if not _all_finite(chunk):
                bad += int((~torch.isfinite(chunk)).sum())
    return bad


def _needs_compute(task: TensorTask, base: Checkpoint) -> bool:
    return task.changed or task.out_dtype != task.in_dtype or base.tensors[task.source].offset is None


def _check_adapters_finite(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters holding NaN or Inf before any output is written."""
    from .errors import NonFiniteError

    for adapter in adapters:
        for key, info in adapter.tensors.items():
            if info.is_float and not _all_finite(adapter.read(key)):
                raise NonFiniteError(f"{adapter.path}: adapter tensor {key!r} holds NaN or Inf; the adapter is broken")


def _all_finite(values) -> bool:
    """Whether a float tensor holds no NaN or Inf, from one min/max pass (both reach the extremes; NaN
    propagates), without the element-wise mask `isfinite` would write; dtypes without min/max use that."""
    import torch

    if values.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(values)
    except (RuntimeError, NotImplementedError):  # e.g. float8
        return bool(torch.isfinite(values).all())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _write_folder_extras(
    target: Path, base: Checkpoint, plan: MergePlan, names: list[str], out_dtype: str | None
) -> None:
    """Index (when sharded), config and every non-weight file of the base folder."""
    if len(names) > 1:
        weight_map = {plan.tasks[i].name: name for shard, name in zip(plan.shards, names, strict=True) for i in shard}
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (target / f"{base.weight_prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for source in base.auxiliary_files():
        relative = source.relative_to(base.folder)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if relative == Path(CARD_NAME):
            continue  # the base's card describes the base; the output gets its own
        if relative == Path("config.json") and base.config is not None:
            config = _updated_config(base.config, plan, out_dtype)
            destination.write_text(json.dumps(config, indent=2) + "\n")
        else:
            shutil.copyfile(source, destination)


def _write_merge_card(
    target: Path,
    operation: str,
    config: dict | None,
    base_name: str,
    base_repo: str | None,
    adapter_names: list[str],
    weights: Sequence[float],
    dtype: str | None,
) -> None:
    verb = "merged into" if operation == "merge" else "removed from"
    command = ["loratool", operation, base_name, *adapter_names, "--output", "OUTPUT"]
    if any(w != 1.0 for w in weights):
        command += [part for w in weights for part in ("--weight", f"{w:g}")]
    if dtype is not None:
        command += ["--dtype", dtype]
    write_card(
        target,
        base_model=base_repo or (config or {}).get("_name_or_path") or base_name,
        library_name="transformers",
        tags=["lora", "merge" if operation == "merge" else "unmerge", "loratool"],
        title=f"{base_name} {'+' if operation == 'merge' else '−'} {', '.join(adapter_names)}",
        summary=f"{base_name} with {len(adapter_names)} LoRA adapter(s) {verb} its weights "
        f"(W' = W {'+' if operation == 'merge' else '−'} Σ wᵢ·ΔWᵢ, summed in fp32 and rounded once).",
        table=(["adapter", "weight"], [[name, f"{w:g}"] for name, w in zip(adapter_names, weights, strict=True)]),
        command=command,
    )


def _write_record(
    target: Path,
    operation: str,
    base_name: str,
    adapters: Sequence[Adapter],
    adapter_names: Sequence[str],
    weights: Sequence[float],
    out_dtype: str | None,
    norms: dict,
) -> None:
    """Leave `loratool_merge.json` (and DoRA norms) so the merge can be undone exactly."""
    record = {
        "tool": "loratool",
        "version": __version__,
        "operation": operation,
        "base": base_name,
        "adapters": [
            {"name": name, "sha256": _adapter_identity(a), "weight": w}
            for a, name, w in zip(adapters, adapter_names, weights, strict=True)
        ],
        "dtype": out_dtype,
    }
    if norms:
        from .io.storage import write_tensors

        write_tensors(target / DORA_NORMS_NAME, norms)
        record["dora_norms"] = {"file": DORA_NORMS_NAME, "tensors": sorted(norms)}
    (target / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _recorded_dora_norms(merged: Path, adapters: Sequence[Adapter], plans: dict) -> dict:
    """The DoRA norms a loratool merge recorded, checked against the adapters given to un-merge."""
    dora_tasks = [(name, t) for name, plan in plans.items() for t in plan.tasks if t.dora is not None]
    if not dora_tasks:
        return {}
    shown = ", ".join(_qualified(name, t.name) for name, t in dora_tasks[:3])
    if not merged.is_dir() or not (merged / RECORD_NAME).is_file():
        raise UnsupportedError(
            f"DoRA cannot be un-merged from merged weights alone ({shown}): the per-row norms are lost. "
            f"Only a folder merged by loratool, which keeps {RECORD_NAME}, can be un-merged exactly"
        )
    record = read_json(merged / RECORD_NAME, RECORD_NAME)
    recorded = {entry.get("sha256") for entry in record.get("adapters", []) if isinstance(entry, dict)}
    for _, task in dora_tasks:
        adapter = adapters[task.dora.adapter]
        if _adapter_identity(adapter) not in recorded:
            raise UnsupportedError(f"{adapter.path} is not the DoRA adapter {merged / RECORD_NAME} says was merged")
    from .io.safetensors_io import read_header
    from .io.tensors import read_safetensors_tensor

    norms_path = merged / DORA_NORMS_NAME
    if not norms_path.is_file():
        raise UnsupportedError(f"{norms_path} is missing; the DoRA merge cannot be undone exactly")
    infos, _ = read_header(norms_path)
    wanted = [_qualified(name, t.name) for name, t in dora_tasks]
    missing = [name for name in wanted if name not in infos]
    if missing:
        raise UnsupportedError(f"{norms_path} has no recorded norm for {', '.join(missing[:3])}")
    return {name: read_safetensors_tensor(infos[name]) for name in wanted}


def merge(
    base: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    dry_run: bool = False,
    alpha: float | None = None,
    allow_nonfinite: bool = False,
    allow_unmatched: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    renames: Sequence[str] = (),
) -> MergeReport:
    """Merge adapters into a base checkpoint: W' = W + Σ wᵢ·ΔWᵢ, streamed tensor by tensor.

    Args:
        base: a model folder or weights file, or a Hub repo id.
        adapters: adapter folders, files or Hub repo ids, merged in order.
        output: the output folder (or a `.safetensors` file for a single-file base).
        weights: one wᵢ per adapter (default 1.0 each; negative allowed).
        dtype: "bf16", "fp16" or "fp32" for every float tensor; None keeps each tensor's dtype.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        max_shard_size: bytes per output shard, e.g. "5GB".
        force: replace an existing output (only once the new one is complete).
        dry_run: plan and report, write nothing.
        alpha: lora_alpha for adapter files that do not record it.
        allow_nonfinite: write NaN/Inf results instead of refusing them.
        allow_unmatched: merge what matches and leave out (with a warning) modules that match nothing.
        checksum: add the sha256 of every output file to the report.
        revision, token: for inputs given as Hub repo ids (`org/name`, or `org/name@revision`).
        progress: called with (bytes done, bytes total) after each tensor.
        renames: `REGEX=REPLACEMENT` rules applied to adapter module paths before matching.

    Returns:
        A `MergeReport`.

    Raises:
        InvalidInputError: (and subclasses) for inputs that cannot be merged; nothing is written.
        EnvironmentProblem: device or disk space problems.

    Example:
        >>> report = merge("llama", ["my-lora"], "llama-merged")
    """
    return _run(
        "merge", base, adapters, output, weights=weights, dtype=dtype, device=device,
        max_shard_size=max_shard_size, force=force, dry_run=dry_run, alpha=alpha,
        allow_nonfinite=allow_nonfinite, allow_unmatched=allow_unmatched, checksum=checksum, revision=revision, token=token, progress=progress,
        renames=renames,
    )  # fmt: skip


def unmerge(
    merged: str | os.PathLike,
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    device: str = "auto",
    max_shard_size: int | str = "5GB",
    force: bool = False,
    dry_run: bool = False,
    alpha: float | None = None,
    allow_nonfinite: bool = False,
    allow_unmatched: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    renames: Sequence[str] = (),
) -> MergeReport:
    """Undo a merge: W = W' − Σ wᵢ·ΔWᵢ, with the same arithmetic and options as `merge`.

    DoRA modules are undone exactly only for folders merged by loratool, whose
    `loratool_merge.json` keeps the norms the merge divided by.
    """
    return _run(
        "unmerge", merged, adapters, output, weights=weights, dtype=dtype, device=device,
        max_shard_size=max_shard_size, force=force, dry_run=dry_run, alpha=alpha,
        allow_nonfinite=allow_nonfinite, allow_unmatched=allow_unmatched, checksum=checksum, revision=revision, token=token, progress=progress,
        renames=renames,
    )  # fmt: skip
