"""Low-rank extraction (`extract`: full fine-tune → LoRA) and rank resizing (`resize`).

extract: for each weight that differs, Δ = W_tuned − W_base in fp32, truncated
SVD (randomized when the rank is small against the matrix), balanced factors
A = √S·Vhᵣ, B = Uᵣ·√S, alpha = rank so the scale is 1.

resize: re-factorises an adapter's ΔW = s·B·A exactly through QR of B and Aᵀ
and the SVD of the small r×r core, without ever forming ΔW.

Factors are spooled to disk as they are produced, so memory stays bounded by
one weight matrix whatever the adapter's size; the output folder appears atomically.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import trace
from .adapters.reading import read_adapter
from .errors import IncompatibleError, InvalidInputError, UnsupportedError
from .io.card import display_name, write_card
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.hub import resolve_input
from .io.output import atomic_output, checksums
from .io.safetensors_io import SafetensorsWriter, TensorInfo
from .io.storage import naming
from .plan import OUTPUT_DTYPES
from .rank import RankRule, choose_rank, spectrum_decided
from .serving import as_peft

if TYPE_CHECKING:
    import torch

__all__ = [
    "extract",
    "resize",
    "factorize",
    "ExtractReport",
    "ModuleExtraction",
    "plan_extraction",
    "ExtractTask",
    "Spool",
    "peft_adapter_config",
    "write_adapter_config",
]

Progress = Callable[[int, int], None]
METHODS = ("auto", "svd", "randomized")
EMBEDDING_MODES = ("skip", "lora", "full")
_OVERSAMPLE = 8
_POWER_ITERATIONS = 4
_CONV1D_MODEL_TYPES = frozenset({"gpt2"})


@dataclass(frozen=True)
class ExtractTask:
    """One base weight to decompose: `module` is its module path, `kind` how PEFT carries it."""

    module: str
    tensor: str
    shape: tuple[int, ...]
    kind: str  # "linear", "conv", "embedding"
    fan_in_fan_out: bool = False
    embedding_like: bool = False


@dataclass(frozen=True)
class ExtractPlan:
    tasks: list[ExtractTask]
    one_dimensional: list[str]
    skipped: list[dict]


def _is_embedding_like(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe", "lm_head", "embed_out", "output")


def plan_extraction(
    base: Mapping[str, TensorInfo],
    tuned: Mapping[str, TensorInfo],
    *,
    base_config: dict | None = None,
    tuned_config: dict | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: str = "skip",
    skip_mismatched: bool = False,
) -> ExtractPlan:
    """Pair base and tuned tensors by name and decide how each could be carried (pure: headers only).

    Raises:
        InvalidInputError: different architectures, mismatched or one-sided tensors
            (unless `skip_mismatched`), bad regexes, or nothing selected.
    """
    base_type = (base_config or {}).get("model_type")
    tuned_type = (tuned_config or {}).get("model_type")
    if base_type and tuned_type and base_type != tuned_type:
        raise InvalidInputError(f"BASE is a {base_type} model and TUNED a {tuned_type} model; they must match")
    if embeddings not in EMBEDDING_MODES:
        raise InvalidInputError(f"--embeddings must be one of {', '.join(EMBEDDING_MODES)}, got {embeddings!r}")
    patterns = {}
    for option, value in (("--include", include), ("--exclude", exclude)):
        if value is not None:
            try:
                patterns[option] = re.compile(value)
            except re.error as exc:
                raise InvalidInputError(f"{option} {value!r} is not a valid regular expression ({exc})") from exc

    problems, skipped = [], []
    for name in tuned:
        if name not in base:
            problems.append(f"{name} is only in TUNED")
    for name, info in base.items():
        other = tuned.get(name)
        if other is None:
            problems.append(f"{name} is only in BASE")
        elif other.shape != info.shape:
            problems.append(
                f"{name} is {list(info.shape)} in BASE but {list(other.shape)} in TUNED (resized vocabulary?)"
            )
        elif other.dtype != info.dtype and not (other.is_float and info.is_float):
            problems.append(f"{name} is {info.dtype} in BASE but {other.dtype} in TUNED")
    if problems and not skip_mismatched:
        raise IncompatibleError(
            f"{len(problems)} tensor(s) do not pair up between BASE and TUNED (pass --skip-mismatched to leave them out)",
            problems,
        )
    skipped += [{"name": p.split(" ", 1)[0], "reason": p.split(" ", 1)[1]} for p in problems]

    conv1d = base_type in _CONV1D_MODEL_TYPES
    tasks, one_dimensional = [], []
    for name, info in base.items():
        other = tuned.get(name)
        if other is None or other.shape != info.shape or not info.is_float:
            continue
        module, _, leaf = name.rpartition(".")
        if "--include" in patterns and not patterns["--include"].search(name):
            continue
        if "--exclude" in patterns and patterns["--exclude"].search(name):
            continue
        if len(info.shape) == 1:
            one_dimensional.append(name)
            continue
        if leaf != "weight" or len(info.shape) > 5:
            skipped.append({"name": name, "reason": "not a weight PEFT can carry as LoRA"})
            continue
        embedding_like = _is_embedding_like(module)
        if embedding_like and embeddings == "skip":
            skipped.append({"name": name, "reason": "embedding / lm_head (use --embeddings lora|full)"})
            continue
        if len(info.shape) > 2:
            kind = "conv"
        elif embedding_like and module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out", "output"):
            kind = "embedding"
        else:
            kind = "linear"
        fan_in_fan_out = conv1d and kind == "linear" and not embedding_like
        tasks.append(ExtractTask(module, name, info.shape, kind, fan_in_fan_out, embedding_like))
    if not tasks:
        raise InvalidInputError("no weight is selected for extraction (check --include / --exclude / --embeddings)")
    return ExtractPlan(tasks, one_dimensional, skipped)


@dataclass(frozen=True)
class ModuleExtraction:
    """What one module became: its rank, how much of ‖Δ‖² it keeps, its relative error."""

    name: str
    rank: int
    energy_kept: float
    relative_error: float
    method: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExtractReport:
    operation: str
    output: str
    device: str
    modules: list[ModuleExtraction]
    skipped: list[dict]
    unchanged: list[str]
    changed_1d: list[dict]
    modules_to_save: list[str]
    parameters: int
    bytes: int
    full_delta_parameters: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] | None = None
    block_diagonal: list[str] = field(default_factory=list)  # convert --naming: modules fused at summed rank

    @property
    def mean_relative_error(self) -> float:
        return mean_relative_error(self.modules)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean_relative_error": self.mean_relative_error}


def mean_relative_error(modules: Sequence) -> float:
    """Mean of the modules' `relative_error` (0 for none), as extract, resize and combine report it."""
    return sum(m.relative_error for m in modules) / len(modules) if modules else 0.0


# --- factorisation --------------------------------------------------------------


def _randomized_svd(matrix: torch.Tensor, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading `width` singular triplets by a seeded randomized range finder with power iterations."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    sketch = torch.randn(matrix.shape[1], width, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ sketch).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    small_u, values, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ small_u, values, vh


def factorize(
    matrix: torch.Tensor, rule: RankRule, method: str, seed: int = 0, scratch: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Balanced rank-r factors B (m×r), A (r×n) of `matrix` (fp32/fp64) chosen by `rule`.

    `auto` uses the randomized SVD when the largest rank the rule may pick is
    small against the matrix (growing the sketch until energy / ratio criteria
    are decided), and a full SVD otherwise. Returns (B, A, method used).
    `scratch`: a reusable buffer of `matrix`'s shape and dtype (else one is allocated).
    """
    import torch

    full_rank = min(matrix.shape)
    total = float(torch.pow(matrix, 2, out=scratch).sum() if scratch is not None else matrix.pow(2).sum())
    ceiling = rule.ceiling(full_rank)
    use_full = method == "svd" or (method == "auto" and (ceiling + _OVERSAMPLE) * 4 > full_rank)
    values = vh = left = None
    if not use_full:
        width = ceiling + _OVERSAMPLE if rule.rank is not None or rule.max_rank else min(64, ceiling) + _OVERSAMPLE
        while True:
            width = min(width, full_rank)
            left, values, vh = _randomized_svd(matrix, width, seed)
            if spectrum_decided(values.tolist()[: width - _OVERSAMPLE] or values.tolist(), total, rule, full_rank):
                break
            if width >= full_rank // 2:
                if method == "randomized":
                    break
                use_full = True
                break
            width *= 2
    if use_full:
        left, values, vh = torch.linalg.svd(matrix, full_matrices=False)
        method = "svd"
    else:
        method = "randomized"
    rank = choose_rank(values.tolist(), total, rule, full_rank)
    root = values[:rank].clamp_min(0).sqrt()
    return left[:, :rank] * root, root[:, None] * vh[:rank], method


@dataclass
class _ModuleResult:
    """What a worker made of one extraction task (factors, the whole tuned tensor, or nothing)."""

    task: ExtractTask
    numel: int
    unchanged: bool = False
    whole: torch.Tensor | None = None
    factors: tuple[torch.Tensor, torch.Tensor] | None = None
    error: float = 0.0
    method: str = ""


# --- output ---------------------------------------------------------------------


class Spool:
    """Factor tensors appended to one scratch file as produced; written out as safetensors at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.entries: dict[str, TensorInfo] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        from .io.tensors import tensor_bytes, to_safetensors_dtype

        data = tensor_bytes(tensor.detach().cpu().contiguous())
        view = memoryview(data).cast("B")
        with naming(self.path):
            while view:
                view = view[os.write(self._fd, view) :]
        self.entries[name] = TensorInfo(
            name, to_safetensors_dtype(tensor.dtype), tuple(tensor.shape), self.path, self._offset
        )
        self._offset += len(memoryview(data).cast("B"))

    def finish(self, destination: Path, metadata: dict[str, str] | None = None) -> int:
        """Write the spooled tensors (sorted by name) as a safetensors file; return its size."""
        os.close(self._fd)
        ordered = sorted(self.entries)
        writer = SafetensorsWriter(
            destination,
            [(n, self.entries[n].dtype, self.entries[n].shape) for n in ordered],
            {"format": "pt", **(metadata or {})},
        )
        for name in ordered:
            writer.copy_from(name, self.entries[name])
        writer.close()
        self.path.unlink()
        return writer.total_bytes


def peft_adapter_config(
    ranks: dict[str, int],
    alphas: dict[str, float],
    *,
    base_model: str | None,
    fan_in_fan_out: bool,
    modules_to_save: list[str],
    use_rslora: bool = False,
    extra: dict | None = None,
) -> dict:
    """An adapter_config.json PEFT loads: the most common rank/alpha as defaults, the rest as patterns."""
    common_rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    common_alpha = Counter(a for m, a in alphas.items() if ranks[m] == common_rank).most_common(1)[0][0] if ranks else 8
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": common_rank,
        "lora_alpha": common_alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != common_rank},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != common_alpha},
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update(extra or {})
    return config


def write_adapter_config(folder: Path, config: dict) -> None:
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _lora_keys(module: str, kind: str) -> tuple[str, str]:
    prefix = f"base_model.model.{module}"
    if kind == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def _factor_shapes(task: ExtractTask, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape matrix factors into the tensor shapes PEFT stores for this layer kind."""
    if task.kind == "conv":
        rank = a.shape[0]
        return b.reshape(b.shape[0], rank, *([1] * (len(task.shape) - 2))), a.reshape(rank, *task.shape[1:])
    return b, a


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

    Returns:
        An `ExtractReport` with per-module rank, energy kept and relative error.
    """
    from .compute.pool import import_torch, one_torch_thread

    torch = import_torch()  # a fifth faster without cyclic GC during the import
    from .compute.workers import ModuleWorkers
    from .device import resolve_devices
    from .io.tensors import return_freed_memory_to_os, to_torch_dtype

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
    (base_local, base_repo), (tuned_local, tuned_repo) = (
        resolve_input(base, revision=revision, token=token),
        resolve_input(tuned, revision=revision, token=token),
    )
    from .quant import dequantized

    base_checkpoint, tuned_checkpoint = (
        dequantized(open_checkpoint(base_local)),
        dequantized(open_checkpoint(tuned_local)),
    )
    plan = plan_extraction(
        base_checkpoint.tensors,
        tuned_checkpoint.tensors,
        base_config=base_checkpoint.config,
        tuned_config=tuned_checkpoint.config,
        include=include,
        exclude=exclude,
        embeddings=embeddings,
        skip_mismatched=skip_mismatched,
    )
    from .layouts.disk_names import plan_in_memory_names

    plan = plan_in_memory_names(plan, base_checkpoint.config, base_checkpoint.tensors)  # PEFT's in-memory names
    output = Path(output)
    modules: list[ModuleExtraction] = []
    unchanged: list[str] = []
    ranks: dict[str, int] = {}
    modules_to_save: list[str] = []
    notes: list[str] = []
    full_delta = 0
    parameters = 0
    total = sum(task_info.numel for task_info in (base_checkpoint.tensors[t.tensor] for t in plan.tasks))
    done = 0

    def extract_module(task: ExtractTask, workspace) -> _ModuleResult:
        """Δ of one module and its factors (runs on a worker thread; reads only, writes nothing)."""
        if task.kind == "experts":  # a fused in-memory parameter: a PEFT target_parameters LoRA
            return _experts_result(task, base_checkpoint, tuned_checkpoint, rule, method, factor_dtype)
        info = base_checkpoint.tensors[task.tensor]
        compute = torch.float64 if info.dtype == "F64" else torch.float32
        # read through mappings into one reused buffer: no tensor-sized allocation (a page fault per 4 KiB) per module
        with (
            _values(tuned_checkpoint, task.tensor) as tuned_values,
            _values(base_checkpoint, task.tensor) as base_values,
        ):
            delta = workspace.get("delta", info.shape, compute).copy_(tuned_values)
            delta.sub_(base_values.to(workspace.device))  # promoted to `compute` exactly, as a converted copy would be
        if not bool(delta.any()):
            return _ModuleResult(task, delta.numel(), unchanged=True)
        if task.embedding_like and embeddings == "full":
            return _ModuleResult(task, delta.numel(), whole=tuned_checkpoint.read(task.tensor))
        matrix = delta.reshape(delta.shape[0], -1) if task.kind == "conv" else delta
        if task.kind == "embedding" or task.fan_in_fan_out:
            matrix = matrix.T
        scratch = workspace.get("scratch", matrix.shape, compute)
        b, a, used = factorize(matrix, rule, method, seed=_seed(task.module), scratch=scratch)
        # relative error of what is stored: ‖Δ − B·A‖ / ‖Δ‖, after rounding the factors
        b_out, a_out = b.to(factor_dtype), a.to(factor_dtype)
        norm = float(torch.linalg.vector_norm(matrix))
        residual = float(
            torch.linalg.vector_norm(matrix.addmm_(b_out.to(matrix.dtype), a_out.to(matrix.dtype), alpha=-1))
        )
        b_out, a_out = _factor_shapes(task, b_out.cpu(), a_out.cpu())
        return _ModuleResult(
            task, delta.numel(), factors=(b_out, a_out), error=residual / norm if norm else 0.0, method=used
        )

    with (
        atomic_output(output, is_dir=True, force=force, inputs=[base_checkpoint.path, tuned_checkpoint.path]) as target,
        ModuleWorkers(devices, workers) as pool,
        ExitStack() as stack,
    ):
        spool = Spool(target / ".factors.spool")
        skipped_compared = stack.enter_context(ThreadPoolExecutor(1, "loratool-compare", one_torch_thread)).submit(
            _changed_skipped_embeddings, plan.skipped, base_checkpoint, tuned_checkpoint
        )  # while the workers decompose
        for result in pool.map(_traced(extract_module), plan.tasks):
            task = result.task
            done += result.numel
            if result.unchanged:
                unchanged.append(task.tensor)
            elif result.whole is not None:
                spool.add(f"base_model.model.{task.tensor}", result.whole)
                modules_to_save.append(task.module)
            else:
                b_out, a_out = result.factors
                key_a, key_b = _lora_keys(task.module, task.kind)
                spool.add(key_a, a_out)
                spool.add(key_b, b_out)
                ranks[task.module] = a_out.shape[0] // (task.shape[0] if task.kind == "experts" else 1)
                parameters += a_out.numel() + b_out.numel()
                full_delta += result.numel
                error = result.error
                modules.append(
                    ModuleExtraction(
                        task.module, ranks[task.module], max(0.0, 1 - error * error), error, result.method, task.shape
                    )
                )
            if progress is not None:
                progress(done, total)
        trace.mark("modules done")
        changed_1d = _changed_one_dimensional(plan.one_dimensional, base_checkpoint, tuned_checkpoint)
        if changed_1d:
            targeted = set(ranks)
            if save_1d:
                for item in changed_1d:
                    module = item["name"].rpartition(".")[0]
                    if module in targeted:
                        notes.append(f"{item['name']} changed but its module is a LoRA target; it is not stored")
                        continue
                    spool.add(f"base_model.model.{item['name']}", tuned_checkpoint.read(item["name"]))
                    modules_to_save.append(module)
            else:
                largest = max(changed_1d, key=lambda i: i["max_abs_change"])
                notes.append(
                    f"{len(changed_1d)} 1-D tensors (norms, biases) changed, the largest {largest['name']} by "
                    f"{largest['max_abs_change']:.3g}; not stored (pass --save-1d to keep norms in modules_to_save)"
                )
        changed_embeddings = skipped_compared.result()
        if changed_embeddings:
            notes.append(
                f"{', '.join(changed_embeddings)} changed but were skipped (serving engines reject adapters "
                "carrying full embeddings); pass --embeddings lora or --embeddings full to keep them"
            )
        if not ranks and not modules_to_save:
            raise InvalidInputError(
                "BASE and TUNED are identical on every selected weight; there is nothing to extract"
            )
        trace.mark("embeddings compared")
        size = spool.finish(target / "adapter_model.safetensors")
        trace.mark("spool written")
        base_name = display_name(base, base_repo)
        base_model = base_repo or (base_checkpoint.config or {}).get("_name_or_path") or base_name
        from .layouts.expert_extraction import peft_expert_fields
        from .layouts.transformers import layout_for

        _, layout = layout_for(base_checkpoint.config)  # fused experts and routers: target_parameters
        config_ranks, targets = peft_expert_fields(plan.tasks, ranks, layout)
        write_adapter_config(
            target,
            peft_adapter_config(
                config_ranks,
                {m: float(r) for m, r in config_ranks.items()},
                base_model=base_model,
                fan_in_fan_out=any(t.fan_in_fan_out for t in plan.tasks if t.module in ranks),
                modules_to_save=sorted(set(modules_to_save)),
                extra=targets,
            ),
        )
        rule_words = _rule_words(rule)
        command = ["loratool", "extract", base_name, display_name(tuned, tuned_repo), "--output", "OUTPUT", *rule_words]
        for flag, value in (("--include", include), ("--exclude", exclude)):
            if value is not None:
                command += [flag, value]
        if embeddings != "skip":
            command += ["--embeddings", embeddings]
        _adapter_card(target, base_model, f"LoRA extracted from {display_name(tuned, tuned_repo)}", modules, command)
        digests = checksums(target) if checksum else None
    return ExtractReport(
        operation="extract",
        output=str(output),
        device=",".join(str(d) for d in devices),
        modules=modules,
        skipped=plan.skipped,
        unchanged=unchanged,
        changed_1d=changed_1d,
        modules_to_save=sorted(set(modules_to_save)),
        parameters=parameters,
        bytes=size,
        full_delta_parameters=full_delta,
        seconds=time.perf_counter() - started,
        notes=notes,
        checksums=digests,
    )


def _experts_result(task, base_checkpoint, tuned_checkpoint, rule: RankRule, method: str, factor_dtype):
    """One fused expert parameter's stacked factors (`expert_extraction`), as a worker's result."""
    from .layouts.expert_extraction import extract_expert_factors, relative_error

    def factor(matrix, seed_name):
        return factorize(matrix, rule, method, seed=_seed(seed_name))

    numel = sum(base_checkpoint.tensors[name].numel for name in task.sources)
    found = extract_expert_factors(task, base_checkpoint.read, tuned_checkpoint.read, factor)
    if found is None:
        return _ModuleResult(task, numel, unchanged=True)
    b, a, deltas, used = found
    b_out, a_out = b.to(factor_dtype).cpu(), a.to(factor_dtype).cpu()
    return _ModuleResult(task, numel, factors=(b_out, a_out), error=relative_error(b_out, a_out, deltas), method=used)


def _values(checkpoint, name: str) -> AbstractContextManager[torch.Tensor]:
    """One tensor's values: a read-only mapping of a plain checkpoint's file, else a fresh read (which, for a
    `quant.dequantized` checkpoint, dequantizes)."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.mapped(name)
    return nullcontext(checkpoint.read(name))


def _changed_skipped_embeddings(skipped: list[dict], base_checkpoint, tuned_checkpoint) -> list[str]:
    """The embeddings the plan skipped that differ between BASE and TUNED."""
    with trace.span("compare skipped embeddings"):
        return [
            item["name"]
            for item in skipped
            if item["reason"].startswith("embedding")
            and _differ(base_checkpoint.tensors[item["name"]], tuned_checkpoint.tensors[item["name"]])
        ]


def _traced(fn):
    """`fn(task, workspace)` in a trace span named after the task's tensor (see lora_tools.trace)."""

    def run(task, workspace):
        with trace.span("module", task.tensor):
            return fn(task, workspace)

    return run


def _differ(first: TensorInfo, second: TensorInfo, chunk_bytes: int = 16 << 20) -> bool:
    """Whether two stored tensors differ, compared through small mappings."""
    import torch

    from .io.tensors import mapped_tensor

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


def _rule_words(rule: RankRule) -> list[str]:
    words = []
    for flag, value in (("--rank", rule.rank), ("--energy", rule.energy), ("--sv-ratio", rule.sv_ratio),
                        ("--max-rank", rule.max_rank)):  # fmt: skip
        if value is not None:
            words += [flag, f"{value:g}"]
    return words


def _adapter_card(target: Path, base_model: str | None, summary: str, modules: list, command: list[str]) -> None:
    ranks = Counter(m.rank for m in modules)
    mean_error = sum(m.relative_error for m in modules) / len(modules) if modules else 0.0
    write_card(
        target,
        base_model=base_model,
        library_name="peft",
        tags=["lora", "peft", "loratool"],
        title=summary,
        summary=f"{summary}: {len(modules)} modules, mean relative error {mean_error:.4g} (‖Δ − B·A‖ / ‖Δ‖).",
        table=(["rank", "modules"], [[str(rank), str(count)] for rank, count in sorted(ranks.items())]),
        command=command,
    )


def _changed_one_dimensional(names: Sequence[str], base, tuned) -> list[dict]:
    changed = []
    for name in names:
        difference = (tuned.read(name).double() - base.read(name).double()).abs()
        if difference.numel() and float(difference.max()) > 0:
            changed.append({"name": name, "max_abs_change": float(difference.max())})
    return changed


def resize(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    device: str = "auto",
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
) -> ExtractReport:
    """Re-factorise an adapter's ΔW = s·B·A to a new rank, exactly and without forming ΔW.

    QR of B and of Aᵀ, then the SVD of the small r×r core, give ΔW's exact SVD;
    the rank rule picks k and the new balanced factors keep each module's scale
    (alpha is set to s·k, or s·√k for rsLoRA). Modules already at or below the new
    rank are re-balanced at their rank; DoRA magnitudes, lora_B.bias and
    modules_to_save are copied unchanged. `workers` modules are re-factorised at
    once (see `extract`); the output is byte-identical for any number.
    """
    import torch

    from .compute.workers import ModuleWorkers
    from .device import resolve_devices

    started = time.perf_counter()
    rule = RankRule(rank, energy, sv_ratio, max_rank)
    adapter_local, adapter_repo = resolve_input(adapter, revision=revision, token=token)
    source = as_peft(read_adapter(adapter_local))  # GGUF / mlx-lm adapters resize into PEFT folders too
    if source.format != "peft":
        raise UnsupportedError(f"{source.path}: resize writes PEFT folders; convert this {source.format} adapter first")
    devices = resolve_devices(device)
    output = Path(output)
    modules: list[ModuleExtraction] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    parameters = full = 0
    handled: set[str] = set()

    def resize_module(module, workspace):
        """The exact re-factorisation of one module (runs on a worker thread)."""
        a = source.read(module.a_key).to(workspace.device, torch.float64)
        b = source.read(module.b_key).to(workspace.device, torch.float64)
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        q_b, r_b = torch.linalg.qr(b2)
        q_a, r_a = torch.linalg.qr(a2.T)
        core_u, values, core_vh = torch.linalg.svd(r_b @ r_a.T)
        total = float(values.pow(2).sum())
        new_rank = max(1, choose_rank(values.tolist(), total, rule, module.rank))
        root = values[:new_rank].sqrt()
        new_b = (q_b @ core_u[:, :new_rank]) * root
        new_a = root[:, None] * (core_vh[:new_rank] @ q_a.T)
        new_b = new_b.reshape(b.shape[0], new_rank, *b.shape[2:]).to(torch.float32).cpu()
        new_a = new_a.reshape(new_rank, *a.shape[1:]).to(torch.float32).cpu()
        kept = float(values[:new_rank].pow(2).sum()) / total if total else 1.0
        return module, a, b, new_a, new_b, kept

    with (
        atomic_output(output, is_dir=True, force=force, inputs=[source.path]) as target,
        ModuleWorkers(devices, workers) as pool,
    ):
        spool = Spool(target / ".factors.spool")
        for number, (module, a, b, new_a, new_b, kept) in enumerate(pool.map(resize_module, source.modules), 1):
            new_rank = new_a.shape[0]
            spool.add(module.a_key, new_a)
            spool.add(module.b_key, new_b)
            handled |= {module.a_key, module.b_key}
            ranks[module.name] = new_rank
            alphas[module.name] = module.scale * (new_rank**0.5 if source.use_rslora else new_rank)
            parameters += new_a.numel() + new_b.numel()
            full += a.numel() + b.numel()
            error = max(0.0, 1 - kept) ** 0.5
            modules.append(
                ModuleExtraction(module.name, new_rank, kept, error, "qr-svd", tuple(b.shape[:1]) + tuple(a.shape[1:]))
            )
            if progress is not None:
                progress(number, len(source.modules))
        for key in source.tensors:
            if key not in handled:
                spool.add(key, source.read(key))
        size = spool.finish(target / "adapter_model.safetensors")
        config = dict(source.config)
        config.update(
            peft_adapter_config(
                ranks,
                alphas,
                base_model=source.base_model,
                fan_in_fan_out=bool(source.config.get("fan_in_fan_out", False)),
                modules_to_save=list(source.config.get("modules_to_save") or []),
                use_rslora=source.use_rslora,
                extra={"use_dora": bool(source.config.get("use_dora", False))},
            )
        )
        write_adapter_config(target, config)
        name = display_name(adapter, adapter_repo)
        command = ["loratool", "resize", name, "--output", "OUTPUT", *_rule_words(rule)]
        _adapter_card(target, source.base_model, f"{name} resized", modules, command)
        digests = checksums(target) if checksum else None
    return ExtractReport(
        operation="resize",
        output=str(output),
        device=",".join(str(d) for d in devices),
        modules=modules,
        skipped=[],
        unchanged=[],
        changed_1d=[],
        modules_to_save=list(source.config.get("modules_to_save") or []),
        parameters=parameters,
        bytes=size,
        full_delta_parameters=full,
        seconds=time.perf_counter() - started,
        checksums=digests,
    )
