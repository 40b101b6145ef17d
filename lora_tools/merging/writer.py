"""Streaming planned checkpoints to disk: copy what does not change, compute what does, one tensor at a time.

Tensors no adapter touches are copied file-to-file (in the kernel) on a helper thread,
started before torch is imported; each changed tensor is computed from a read-only
mapping of the base and its rows written into their place in the output.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

from .. import trace
from ..io.checkpoint import Checkpoint
from ..io.safetensors_writer import SafetensorsWriter
from ..planning.merge_plan import MergePlan, TensorTask
from ..planning.shards import shard_file_names
from .checks import CopyChecks, check_adapters_finite
from .lanes import Lane, deal, no_cyclic_gc
from .report import TensorChange, describe_terms, qualified_name

__all__ = ["MergeWriter", "Shard", "ShardTask"]


@dataclass
class Shard:
    """One output file being written: its copies in flight and the tensors left to compute."""

    base: Checkpoint
    component: str | None
    writer: SafetensorsWriter
    copies: list = field(default_factory=list)  # (task, future): bytes that come through unchanged
    quantized: list = field(default_factory=list)  # tasks of quantized weights (and their scales)
    computed: list = field(default_factory=list)  # tasks of tensors to compute


class MergeWriter:
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
        self.copy_checks = CopyChecks(wanted=not allow_nonfinite)
        self.changes: list[TensorChange] = []
        self.quant: dict = {}  # component → planning.quantized.QuantizedRoutes, then merging.quantized.QuantizedTensors
        self.norms: dict = {}
        self.shards: list[Shard] = []
        self.copier = ThreadPoolExecutor(1, thread_name_prefix="loratool-copy")
        self.lanes: list = []
        self._threads = ExitStack()

    def close(self) -> None:
        self.copy_checks.abandon()  # a copier waiting for torch (the run stopped before it was imported)
        self.copier.shutdown(wait=True, cancel_futures=True)
        for lane in self.lanes:
            lane.close()
        self._threads.close()

    def advance(self, nbytes: int) -> None:
        with self._progress_lock:  # several device lanes may report at once
            self._advance(nbytes)

    def fetch(self, index: int, key: str):
        return self.adapters[index].read(key)

    def prepare(
        self, base: Checkpoint, plan: MergePlan, target: Path, single_file: bool, component: str | None,
        only: int | None = None,
    ):  # fmt: skip
        """Create one checkpoint's shard files in `target` (a folder, or the file itself) and start their copies
        (`only`: just that shard, as a task of `ShardTask`).

        Returns the shard file names.
        """
        names = [target.name] if single_file else shard_file_names(len(plan.shards), base.weight_prefix)
        paths = [target] if single_file else [target / n for n in names]
        quantized = self.quant.get(component)
        for index, (shard, path) in enumerate(zip(plan.shards, paths, strict=True)):
            if only is not None and index != only:
                continue
            tasks = [plan.tasks[i] for i in shard]
            writer = SafetensorsWriter(path, [(t.name, t.out_dtype, t.shape) for t in tasks], {"format": "pt"})
            job = Shard(base, component, writer)
            self.shards.append(job)
            if quantized is not None:  # dequantize → merge → requantize, after torch is imported (see `run`)
                job.quantized = [t for t in tasks if quantized.handles(t.name)]
                tasks = [t for t in tasks if not quantized.handles(t.name)]
            job.computed = [task for task in tasks if _needs_compute(task, base)]
            for task in tasks:
                if not _needs_compute(task, base):
                    info = base.tensors[task.source]
                    copied = self.copier.submit(_copy, writer, task.name, info, self.copy_checks.after_chunk(info))
                    job.copies.append((task, copied))
        return names

    def start(self, device: str, threads: int | None = None):
        """Import torch, resolve the device(s) and check what must be checked before computing; return the devices.

        `threads`: a CPU lane's row workers (default: the usable cores).
        """
        from ..compute.pool import single_threaded_torch, usable_cores

        with trace.span("import torch"):
            self._threads.enter_context(single_threaded_torch())  # from here on, our own pools use the cores
        from ..compute.device import resolve_devices
        from ..io.tensors import return_freed_memory_to_os

        return_freed_memory_to_os()
        if self.quant:
            from .quantized import QuantizedTensors

            self.quant = {n: QuantizedTensors(r.produced, self.allow_nonfinite) for n, r in self.quant.items()}
        devices = resolve_devices(device)
        check_adapters_finite(self.adapters)
        self.copy_checks.ready.set()  # copied tensors are checked as they are copied, from here on
        self.checks.append(self.copier.submit(self.copy_checks.finish))
        row_workers = (threads or usable_cores()) if len(devices) == 1 else 1
        self.lanes = [Lane(d, row_workers) for d in devices]
        return devices

    def run(self) -> None:
        """Compute every changed tensor, on one device or dealt to several, then finish the files."""
        work = [(job, task) for job in self.shards for task in job.computed]
        with no_cyclic_gc():
            if len(self.lanes) == 1:
                results = self._compute_in_turn(self.lanes[0], work)
            else:
                results = deal(self.lanes, work, self._compute)
        for (job, task), result in zip(work, results, strict=True):
            qualified = qualified_name(job.component, task.name)
            if task.changed:
                change = TensorChange(
                    qualified, describe_terms(task, self.adapters), result.max_abs_delta, result.rounding_error
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

    def _compute(self, lane, job: Shard, task: TensorTask, upcoming):
        """Compute one tensor into its place in the output; `upcoming` (job, task) is staged or prefetched meanwhile."""
        opened = self._open(lane, job, task, upcoming, None)
        try:
            opened.help()
        except BaseException:
            opened.abandon()
            raise
        return opened.finish()

    def _open(self, lane, job: Shard, task: TensorTask, upcoming, before: _Open | None) -> _Open:
        """Open one tensor's input and output and start computing it (see `_Open`): on the CPU, a plain
        LoRA tensor's blocks start on the helpers (after `before`'s); any other tensor is computed here."""
        from ..io.tensors import to_torch_dtype
        from .arithmetic import BlockedTask, blockwise, compute_task

        qualified = qualified_name(job.component, task.name)
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

    def _write_quantized(self, job: Shard) -> None:
        """Write a shard's quantized weights: dequantize, merge, requantize (or cast), one weight at a time."""
        from .arithmetic import compute_task

        if not job.quantized:
            return
        quantized = self.quant[job.component]

        def compute(logical: TensorTask, values, destination, fetch, workspace):  # a chunk of the weight's rows
            recorded = self.recorded.get(qualified_name(job.component, logical.name))
            return compute_task(logical, values, fetch, workspace, destination, unmerge=self.unmerge,
                                recorded_norm=recorded, allow_nonfinite=self.allow_nonfinite)  # fmt: skip

        for task in job.quantized:
            result = quantized.write(task, job.base, job.writer, compute, self.fetch, self.lanes[0])
            if result is not None:
                logical = quantized.produced[task.name][1]
                qualified = qualified_name(job.component, task.name)
                self.changes.append(TensorChange(qualified, describe_terms(task, self.adapters), result.max_abs_delta))
                if result.dora_norm is not None and not self.unmerge:
                    self.norms[qualified_name(job.component, logical.name)] = result.dora_norm
            self.advance(task.nbytes)


class _Open:
    """One tensor being computed (`MergeWriter._open`): its mapping and output place stay open until `finish`.

    A blockwise tensor's blocks run on the pool's helpers (`batch`, started when opened) and on the
    calling thread (`help`); `finish` waits for them, checks the result and closes the tensor.
    `abandon` stops it after an error elsewhere, once no block of it runs.
    """

    def __init__(self, writing: MergeWriter, job: Shard, task: TensorTask, stack: ExitStack) -> None:
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


def _copy(writer: SafetensorsWriter, name: str, info, after_chunk) -> None:
    with trace.span("copy", name):
        writer.copy_from(name, info, after_chunk)


def _needs_compute(task: TensorTask, base: Checkpoint) -> bool:
    return task.changed or task.out_dtype != task.in_dtype or base.tensors[task.source].offset is None


@dataclass(frozen=True)
class ShardTask:
    """Writes one output shard of a planned merge, as an executor's task (`compute.executor`), on any node.

    The driver planned the merge and created the output's folders; each task opens the base and the
    adapters from their paths (which every node sees), writes its shard file into the temporary output
    with one core, and returns the shard's tensor changes and DoRA norms for the driver's report and
    record. A retried task rewrites its file from the start.
    """

    adapters: list
    unmerge: bool
    allow_nonfinite: bool
    recorded: dict
    components: dict
    plans: dict
    target: Path
    single_file: bool
    device: str

    def __call__(self, shard: tuple[str | None, int], workspace) -> tuple[list[TensorChange], dict]:
        from contextlib import closing

        component, index = shard
        writing = MergeWriter(self.adapters, self.unmerge, self.allow_nonfinite, self.recorded, lambda nbytes: None)
        folder = self.target / component if component else self.target
        with closing(writing):
            writing.prepare(
                self.components[component], self.plans[component], folder, self.single_file, component, index
            )
            writing.start(self.device, threads=1)
            writing.run()
        return writing.changes, writing.norms
