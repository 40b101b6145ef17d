"""`extract`: a LoRA adapter from a full fine-tune, TUNED − BASE ≈ B·A per module, as a PEFT folder.

For each weight that differs, Δ = W_tuned − W_base in fp32, truncated SVD (randomized
when the rank is small against the matrix), balanced factors A = √S·Vhᵣ, B = Uᵣ·√S,
alpha = rank so the scale is 1. Factors are spooled to disk as they are produced, so
memory stays bounded by one weight matrix whatever the adapter's size; the output
folder appears atomically.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from .. import trace
from ..adapters.model import ModuleFactors
from ..adapters.peft import PEFT_PREFIX, WEIGHTS_NAME, peft_adapter_config, spool_module, write_adapter_config
from ..adapters.report import ExtractReport, ModuleExtraction
from ..compute.device import device_names, resolve_devices
from ..compute.executor import Executor, executor_for
from ..errors import InvalidInputError
from ..extraction.modules import (
    ModuleExtractor,
    ModuleResult,
    changed_one_dimensional,
    changed_skipped_embeddings,
    traced,
)
from ..extraction.plan import METHODS, ExtractPlan, plan_extraction
from ..io.card import display_name, write_adapter_card
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..io.spool import Spool
from ..layouts.expert_extraction import peft_expert_fields
from ..layouts.transformers import layout_for
from ..lowrank.rank import RankRule
from ..planning.disk_names import plan_in_memory_names
from ..planning.merge_plan import OUTPUT_DTYPES
from ..quant.dequantize import dequantized
from ..units import Progress

__all__ = ["extract"]


def extract(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    method: str = "auto",
    embeddings: str = "skip",
    save_1d: bool = False,
    skip_mismatched: bool = False,
    device: str = "auto",
    dtype: str | None = None,
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    executor: str | Executor = "local",
) -> ExtractReport:
    """Extract a LoRA adapter approximating TUNED − BASE, as a PEFT folder.

    Args:
        base, tuned: checkpoints of the same architecture.
        output: the adapter folder to write.
        rank / energy / sv_ratio: exactly one rank rule (fixed rank; fraction of ‖Δ‖²_F kept;
            singular values above S₀/sv_ratio), capped by `max_rank`.
        include, exclude: regexes over tensor names.
        method: "auto", "svd" or "randomized".
        embeddings: "skip" (default), "lora" (PEFT embedding LoRA) or "full" (modules_to_save).
        save_1d: store changed 1-D tensors (norms) of modules LoRA does not target in modules_to_save.
        skip_mismatched: leave out tensors whose shapes differ or that exist on one side only.
        dtype: dtype of the factors ("fp32" default, "bf16", "fp16").
        checksum: add the sha256 of every output file to the report.
        revision, token: for inputs given as Hub repo ids.
        workers: modules decomposed at once, each single-threaded (default: the usable cores, or one
            per device for a device list); the output is byte-identical for any number.
        executor: "local" (worker threads here) or "ray" (modules as tasks on the Ray cluster at
            RAY_ADDRESS, inputs and output on paths every node sees); the same bytes either way.

    Returns:
        An `ExtractReport` with per-module rank, energy kept and relative error.
    """
    from ..compute.pool import import_torch, one_torch_thread

    import_torch()  # a fifth faster without cyclic GC during the import
    from ..io.tensors import return_freed_memory_to_os, to_torch_dtype

    started = time.perf_counter()
    rule = RankRule(rank, energy, sv_ratio, max_rank)
    if method not in METHODS:
        raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    dtype_name = OUTPUT_DTYPES.get((dtype or "fp32").lower())
    if dtype_name is None:
        raise InvalidInputError(f"--dtype {dtype!r} is not one of bf16, fp16, fp32")
    factor_dtype = to_torch_dtype(dtype_name)
    devices = resolve_devices(device)
    return_freed_memory_to_os()
    inputs = _Inputs.open(base, tuned, revision, token)
    plan = plan_extraction(
        inputs.base.tensors,
        inputs.tuned.tensors,
        base_config=inputs.base.config,
        tuned_config=inputs.tuned.config,
        include=include,
        exclude=exclude,
        embeddings=embeddings,
        skip_mismatched=skip_mismatched,
    )
    plan = plan_in_memory_names(plan, inputs.base.config, inputs.base.tensors)  # PEFT's in-memory names
    output = Path(output)
    total = sum(inputs.base.tensors[t.tensor].numel for t in plan.tasks)
    extractor = ModuleExtractor(inputs.base, inputs.tuned, rule, method, factor_dtype, embeddings)

    with (
        atomic_output(output, is_dir=True, force=force, inputs=[inputs.base.path, inputs.tuned.path]) as target,
        executor_for(executor, devices, workers) as pool,
        ExitStack() as stack,
    ):
        found = _Collected(Spool(target / ".factors.spool"))
        skipped_compared = stack.enter_context(ThreadPoolExecutor(1, "loratool-compare", one_torch_thread)).submit(
            changed_skipped_embeddings, plan.skipped, inputs.base, inputs.tuned
        )  # while the workers decompose
        for result in pool.map(traced(extractor), plan.tasks, size=lambda t: 2 * inputs.base.tensors[t.tensor].nbytes):
            found.add(result)
            if progress is not None:
                progress(found.done, total)
        trace.mark("modules done")
        changed_1d = changed_one_dimensional(plan.one_dimensional, inputs.base, inputs.tuned)
        found.one_dimensional(changed_1d, save_1d, inputs.tuned)
        found.skipped_embeddings(skipped_compared.result())
        if not found.ranks and not found.modules_to_save:
            raise InvalidInputError(
                "BASE and TUNED are identical on every selected weight; there is nothing to extract"
            )
        trace.mark("embeddings compared")
        size = found.spool.finish(target / WEIGHTS_NAME)
        trace.mark("spool written")
        command = _command(inputs, rule, include, exclude, embeddings)
        base_model = _write_config(target, inputs, plan, found)
        write_adapter_card(target, base_model, f"LoRA extracted from {inputs.tuned_name}", found.modules, command)
        digests = checksums(target) if checksum else None
    return ExtractReport(
        operation="extract",
        output=str(output),
        device=device_names(devices),
        modules=found.modules,
        skipped=plan.skipped,
        unchanged=found.unchanged,
        changed_1d=changed_1d,
        modules_to_save=sorted(set(found.modules_to_save)),
        parameters=found.parameters,
        bytes=size,
        full_delta_parameters=found.full_delta,
        seconds=time.perf_counter() - started,
        notes=found.notes,
        checksums=digests,
        executor=pool.name,
        nodes=pool.nodes,
    )


@dataclass(frozen=True)
class _Inputs:
    """BASE and TUNED opened (Hub ids fetched, quantized weights read as fp32), with their display names."""

    base: Checkpoint
    tuned: Checkpoint
    base_repo: str | None
    base_name: str
    tuned_name: str

    @classmethod
    def open(cls, base, tuned, revision: str | None, token: str | None) -> _Inputs:
        base_local, base_repo = resolve_input(base, revision=revision, token=token)
        tuned_local, tuned_repo = resolve_input(tuned, revision=revision, token=token)
        return cls(
            dequantized(open_checkpoint(base_local)),
            dequantized(open_checkpoint(tuned_local)),
            base_repo,
            display_name(base, base_repo),
            display_name(tuned, tuned_repo),
        )


@dataclass
class _Collected:
    """The workers' results as they arrive: factors spooled, per-module reports, what was left out and why."""

    spool: Spool
    modules: list[ModuleExtraction] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    full_delta: int = 0
    parameters: int = 0
    done: int = 0

    def add(self, result: ModuleResult) -> None:
        task = result.task
        self.done += result.numel
        if result.unchanged:
            self.unchanged.append(task.tensor)
        elif result.whole is not None:
            self.spool.add(f"{PEFT_PREFIX}{task.tensor}", result.whole)
            self.modules_to_save.append(task.module)
        else:
            b_out, a_out = result.factors
            rank = a_out.shape[0] // (task.shape[0] if task.kind == "experts" else 1)
            self.ranks[task.module] = rank
            # alpha = rank: the config records it (extract writes scale 1)
            spool_module(self.spool, ModuleFactors(task.module, a_out, b_out, float(rank), kind=task.kind))
            self.parameters += a_out.numel() + b_out.numel()
            self.full_delta += result.numel
            error = result.error
            self.modules.append(
                ModuleExtraction(task.module, rank, max(0.0, 1 - error * error), error, result.method, task.shape)
            )

    def one_dimensional(self, changed: list[dict], save: bool, tuned: Checkpoint) -> None:
        """Changed norms and biases: kept in modules_to_save with --save-1d (not under a LoRA target), else a note."""
        if not changed:
            return
        if not save:
            largest = max(changed, key=lambda i: i["max_abs_change"])
            self.notes.append(
                f"{len(changed)} 1-D tensors (norms, biases) changed, the largest {largest['name']} by "
                f"{largest['max_abs_change']:.3g}; not stored (pass --save-1d to keep norms in modules_to_save)"
            )
            return
        targeted = set(self.ranks)
        for item in changed:
            module = item["name"].rpartition(".")[0]
            if module in targeted:
                self.notes.append(f"{item['name']} changed but its module is a LoRA target; it is not stored")
                continue
            self.spool.add(f"{PEFT_PREFIX}{item['name']}", tuned.read(item["name"]))
            self.modules_to_save.append(module)

    def skipped_embeddings(self, changed: list[str]) -> None:
        if changed:
            self.notes.append(
                f"{', '.join(changed)} changed but were skipped (serving engines reject adapters "
                "carrying full embeddings); pass --embeddings lora or --embeddings full to keep them"
            )


def _write_config(target: Path, inputs: _Inputs, plan: ExtractPlan, found: _Collected) -> str:
    """Write adapter_config.json (alpha = rank everywhere; fused experts as target_parameters); return base_model."""
    base_model = inputs.base_repo or (inputs.base.config or {}).get("_name_or_path") or inputs.base_name
    _, layout = layout_for(inputs.base.config)
    config_ranks, targets = peft_expert_fields(plan.tasks, found.ranks, layout)
    config = peft_adapter_config(
        config_ranks,
        {m: float(r) for m, r in config_ranks.items()},
        base_model=base_model,
        fan_in_fan_out=any(t.fan_in_fan_out for t in plan.tasks if t.module in found.ranks),
        modules_to_save=sorted(set(found.modules_to_save)),
        extra=targets,
    )
    write_adapter_config(target, config)
    return base_model


def _command(inputs: _Inputs, rule: RankRule, include, exclude, embeddings: str) -> list[str]:
    """The command line the model card shows (the output folder spelled OUTPUT)."""
    command = ["loratool", "extract", inputs.base_name, inputs.tuned_name, "--output", "OUTPUT", *rule.words()]
    for flag, value in (("--include", include), ("--exclude", exclude)):
        if value is not None:
            command += [flag, value]
    if embeddings != "skip":
        command += ["--embeddings", embeddings]
    return command
