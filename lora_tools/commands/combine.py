"""`combine`: several adapters into one adapter whose ΔW is (or approximates) Σ wᵢ·ΔWᵢ per module.

Modules are handled one at a time, factors spooled to disk, the output (a PEFT
folder or a kohya file) appears atomically. The methods are `combining`'s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..adapters import kohya, peft
from ..adapters.inits import refuse_rewritten_base
from ..adapters.model import Adapter, LoraModule, ModuleFactors
from ..adapters.registry import module_writer, read_adapter
from ..adapters.tuners import refuse_tuner
from ..combining.groups import GroupReader, GroupResult, combine_group
from ..combining.options import PEFT_EQUIVALENT, TARGET_FORMATS, CombineOptions
from ..combining.plan import ModuleGroup, plan_combination
from ..combining.report import CombineReport, ModuleCombination
from ..compute.executor import Executor, executor_for
from ..errors import IncompatibleError, InvalidInputError, UnsupportedError
from ..io.card import display_name, write_card
from ..io.checkpoint import open_checkpoint
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..io.spool import Spool
from ..lowrank.rank import RankRule
from ..planning.targets import Targets
from ..units import Progress

__all__ = ["combine"]


def _check_supported(adapter: Adapter, to: str) -> None:
    if adapter.unknown_keys:
        raise InvalidInputError(
            f"{adapter.path}: keys lora_tools does not understand: {', '.join(adapter.unknown_keys[:5])}"
        )
    if adapter.replacements:
        raise UnsupportedError(
            f"{adapter.path}: modules_to_save / trainable tokens ({adapter.replacements[0].key}) replace base "
            "tensors and cannot be combined into a LoRA; merge such adapters into the base instead"
        )
    for module in adapter.modules:
        if module.dora or module.bias_key is not None:
            what = "DoRA (its ΔW depends on the base weight)" if module.dora else "lora_B.bias"
            raise UnsupportedError(f"{adapter.path}: {module.name} has {what}, which combine cannot carry")
        if to == "kohya" and (module.kind == "embedding" or module.fan_in_fan_out):
            raise UnsupportedError(f"{adapter.path}: {module.name} ({module.kind}) has no kohya spelling")


def _namer(adapter: Adapter, base: Path | None, component: str | None, cache: dict) -> Callable[[LoraModule], str]:
    """Output module path for each module: dotted; kohya's underscored names matched through --base."""

    def name_of(module: LoraModule) -> str:
        if not module.kohya_name or base is None:
            return module.name
        part = module.component or component
        if part not in cache:
            folder = base / part if part and (base / part).is_dir() else base
            cache[part] = Targets(open_checkpoint(folder).tensors)
        found = cache[part].find(module)
        if found is None:
            raise IncompatibleError(
                f"{adapter.path} does not fit {base}", [f"{module.name}: no such module in the base"]
            )
        return found

    return name_of


def _restrict(adapter: Adapter, component: str | None) -> Adapter:
    """Take one pipeline component; modules without one (PEFT) count as that component."""
    if component is None:
        return adapter
    modules = [dataclasses.replace(m, component=component) for m in adapter.modules if m.component in (None, component)]
    return dataclasses.replace(adapter, modules=modules)


def _load_inputs(
    specs: Sequence[str | os.PathLike], *, alpha, base, component, to, revision, token
) -> tuple[list[Adapter], list[str], Path | None]:
    loaded, shown = [], []
    for spec in specs:
        local, repo = resolve_input(spec, revision=revision, token=token)
        adapter = _restrict(read_adapter(local, alpha=alpha), component)
        refuse_rewritten_base(adapter, "combine")  # PiSSA/OLoRA/…: its ΔW is not s·B·A alone
        refuse_tuner(adapter, "combined")
        _check_supported(adapter, to)
        if not adapter.modules:
            raise InvalidInputError(f"{adapter.path}: no LoRA module to combine" + (
                f" in component {component}" if component else ""))  # fmt: skip
        loaded.append(adapter)
        shown.append(display_name(spec, repo))
    base_local = resolve_input(base, revision=revision, token=token)[0] if base is not None else None
    kohya = [a.path for a in loaded if any(m.kohya_name for m in a.modules)]
    dotted = [a.path for a in loaded if any(not m.kohya_name for m in a.modules)]
    if kohya and base_local is None and (dotted or to == "peft"):
        raise InvalidInputError(
            f"{kohya[0]}: kohya names are underscored module paths; pass --base (the base model or pipeline) so "
            "they can be matched to dotted module names"
        )
    return loaded, shown, base_local


def _weights_for(weights: Sequence[float] | None, count: int) -> list[float]:
    if not weights:
        return [1.0] * count
    if len(weights) != count:
        raise InvalidInputError(f"got {len(weights)} --weight value(s) for {count} adapters; give one per adapter")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise InvalidInputError(f"--weight must be finite, got {bad[0]}")
    return [float(w) for w in weights]


# --- output ----------------------------------------------------------------------------------


def _write_module(spool: Spool, group: ModuleGroup, result: GroupResult, to: str) -> int:
    """Spool one module's factors in the target format's keys and shapes; return its rank."""
    rank = result.up.shape[1]
    up = result.up.reshape(group.shape[0], rank, *([1] * (len(group.shape) - 2))).contiguous()
    down = result.down.reshape(rank, *group.shape[1:]).contiguous()
    name = group.name
    if to == "kohya":
        prefix = kohya.KOHYA_PREFIX_FOR.get(group.component or "")
        if prefix is None:
            raise InvalidInputError(f"{group.name}: pass --component (unet, text_encoder, …) to name kohya modules")
        name = kohya.kohya_name(prefix, group.name)
    module_writer(to)(spool, ModuleFactors(name, down, up, float(rank), kind=group.kind))
    return rank


def _card(target: Path, base_model, shown, weights, options, report_modules, command) -> None:
    mean = sum(m.relative_error for m in report_modules) / len(report_modules) if report_modules else 0.0
    rows = [[name, f"{weight:g}"] for name, weight in zip(shown, weights, strict=True)]
    write_card(
        target,
        base_model=base_model,
        library_name="peft",
        tags=["lora", "peft", "loratool", "combined"],
        title=f"{len(shown)} adapters combined ({options.method})",
        summary=(
            f"Combined by `{options.method}` (PEFT's `{PEFT_EQUIVALENT[options.method]}`): {len(report_modules)} "
            f"modules, mean relative error {mean:.4g} against the exact Σ wᵢ·ΔWᵢ."
        ),
        table=(["adapter", "weight"], rows),
        command=command,
    )


def _command_words(shown, weights, options: CombineOptions, to: str) -> list[str]:
    words = ["loratool", "combine", *shown, "--output", "OUTPUT", "--method", options.method]
    for weight in weights:
        words += ["--weight", f"{weight:g}"]
    words += options.rule.words() if options.rule is not None else []
    words += ["--max-rank", str(options.max_rank)] if options.rule is None and options.max_rank is not None else []
    if options.density is not None:
        words += ["--density", f"{options.density:g}", "--majority-sign", options.majority_sign]
    if options.method.startswith("dare"):
        words += ["--seed", str(options.seed)]
    return words + (["--to", to] if to != "peft" else [])


def _rule(rank, energy, sv_ratio, max_rank) -> RankRule | None:
    if rank is None and energy is None and sv_ratio is None:
        return None
    return RankRule(rank, energy, sv_ratio, max_rank)


def combine(
    adapters: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    to: str = "peft",
    base: str | os.PathLike | None = None,
    component: str | None = None,
    alpha: float | None = None,
    device: str = "auto",
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    executor: str | Executor = "local",
) -> CombineReport:
    """Combine adapters into one adapter whose ΔW is (or approximates) Σ wᵢ·ΔWᵢ per module.

    Args:
        adapters: adapters in any readable format, made for the same base.
        output: a PEFT folder (`to="peft"`) or a kohya `.safetensors` file (`to="kohya"`).
        weights: one weight per adapter (default 1 each); negative weights subtract.
        method: "cat" (exact), "svd", "ties", "dare-linear", "dare-ties" or "magnitude-prune"
            (PEFT's cat, svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd).
        rank / energy / sv_ratio / max_rank: the rank rule of every method but cat (default: each
            module's largest input rank, as PEFT does).
        density: fraction kept by ties / dare-* / magnitude-prune, in (0, 1].
        majority_sign: TIES' sign election, "total" (sum of values) or "frequency" (count of signs).
        seed: DARE's seed (per module, the generator is seeded by seed and the module name).
        base: the base model (or pipeline), to match kohya names to dotted module paths.
        component: take only this pipeline component (and name PEFT modules with it for kohya output).
        alpha: lora_alpha for lone adapter files that do not record it.
        workers: modules combined at once, one core each (default: the usable cores).
        executor: "local" (worker threads here) or "ray" (modules as tasks on a Ray cluster, inputs
            and output on paths every node sees); the same bytes for any number of workers or nodes.

    Returns:
        A `CombineReport`: per module the adapters that fed it, rank in and out, relative errors.

    Raises:
        InvalidInputError: bad options, weights count ≠ adapters count, unreadable inputs.
        IncompatibleError: the adapters' modules differ in shape (different bases).
        UnsupportedError: DoRA, lora_B.bias, modules_to_save, or a module with no spelling in `to`.
    """
    import torch

    from ..compute.device import resolve_device

    started = time.perf_counter()
    rule = _rule(rank, energy, sv_ratio, max_rank)
    options = CombineOptions(method, rule, density, majority_sign, seed, max_rank)
    if to not in TARGET_FORMATS:
        raise InvalidInputError(f"--to must be one of {', '.join(TARGET_FORMATS)}, got {to!r}")
    if not adapters:
        raise InvalidInputError("give at least one adapter to combine")
    output = Path(output)
    if to == "kohya" and output.suffix != ".safetensors":
        raise InvalidInputError(
            f"kohya adapters are single files: give an --output ending in .safetensors, not {output}"
        )
    factor_weights = _weights_for(weights, len(adapters))
    loaded, shown, base_local = _load_inputs(
        adapters, alpha=alpha, base=base, component=component, to=to, revision=revision, token=token
    )
    cache: dict = {}
    groups = plan_combination(loaded, [_namer(a, base_local, component, cache) for a in loaded])
    components = {g.component for g in groups}
    if to == "peft" and len(components) > 1:
        raise UnsupportedError(
            f"the adapters span components {', '.join(sorted(str(c) for c in components))}; a PEFT folder holds "
            "one model: pass --component, or write --to kohya"
        )
    torch_device = resolve_device(device)
    wide = any(info.dtype == "F64" for adapter in loaded for info in adapter.tensors.values())
    compute = torch.float64 if wide else torch.float32
    reader = GroupReader(loaded, torch_device, compute)
    modules: list[ModuleCombination] = []
    ranks: dict[str, int] = {}
    inputs = [a.path for a in loaded] + ([base_local] if base_local is not None else [])
    with (
        atomic_output(output, is_dir=to == "peft", force=force, inputs=inputs) as target,
        executor_for(executor, [torch_device], workers) as pool,
    ):
        scratch = target / ".factors.spool" if to == "peft" else target.parent / f".{target.name}.spool"
        spool = Spool(scratch)
        try:
            combined = pool.map(functools.partial(_combine, factor_weights, reader, options), groups, size=_group_bytes)
            for number, (group, result) in enumerate(zip(groups, combined, strict=True), 1):
                ranks[group.name] = _write_module(spool, group, result, to)
                modules.append(
                    ModuleCombination(
                        group.name, group.shape, [m.adapter + 1 for m in group.members],
                        sum(m.module.rank for m in group.members), ranks[group.name],
                        result.relative_error, result.truncation_error, result.route,
                    )
                )  # fmt: skip
                del result
                if progress is not None:
                    progress(number, len(groups))
            size = _finish(spool, target, to, loaded, shown, factor_weights, options, modules, ranks)
        finally:
            scratch.unlink(missing_ok=True)
        digests = checksums(target) if checksum else None
        if digests is not None and to == "kohya":
            digests = {output.name: digests[target.name]}
    report = _report(output, to, torch_device, loaded, shown, factor_weights, options, modules, size, started, digests)
    return dataclasses.replace(report, executor=pool.name, nodes=pool.nodes)


def _combine(weights: list[float], reader: GroupReader, options: CombineOptions, group: ModuleGroup, workspace):
    """One output module, on a worker (the reader's device is the driver's choice)."""
    return combine_group(group, weights, reader, options)


def _group_bytes(group: ModuleGroup) -> int:
    """The members' factor bytes (about), to size the executor's tasks."""
    return sum(4 * m.module.rank * (group.shape[0] + math.prod(group.shape[1:])) for m in group.members)


def _finish(spool, target: Path, to, loaded, shown, weights, options, modules, ranks) -> int:
    base_model = next((a.base_model for a in loaded if a.base_model), None)
    if to == "kohya":
        dims = sorted(set(ranks.values()))
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(dims[0]) if len(dims) == 1 else "dynamic",
                    "loratool_combine": f"{options.method} of {len(loaded)} adapters"}  # fmt: skip
        if base_model:
            metadata["ss_sd_model_name"] = base_model
        return spool.finish(target, metadata=metadata)
    size = spool.finish(target / peft.WEIGHTS_NAME)
    fan_in_fan_out = any(m.fan_in_fan_out for a in loaded for m in a.modules)
    config = peft.peft_adapter_config(
        ranks, {m: float(r) for m, r in ranks.items()}, base_model=base_model, fan_in_fan_out=fan_in_fan_out,
        modules_to_save=[],
    )  # fmt: skip
    peft.write_adapter_config(target, config)
    _card(target, base_model, shown, weights, options, modules, _command_words(shown, weights, options, to))
    return size


def _report(output, to, device, loaded, shown, weights, options, modules, size, started, digests) -> CombineReport:
    count = len(loaded)
    partial = [{"module": m.name, "adapters": m.adapters} for m in modules if len(m.adapters) < count]
    notes = []
    if partial:
        notes.append(
            f"{len(partial)} module(s) are in only some of the adapters and were combined from those that have them"
        )
    bases = {a.base_model for a in loaded if a.base_model}
    if len(bases) > 1:
        notes.append(f"the adapters name different base models ({', '.join(sorted(bases))}); their shapes agree")
    inputs = [
        {"adapter": name, "format": a.format, "weight": w, "modules": len(a.modules)}
        for name, a, w in zip(shown, loaded, weights, strict=True)
    ]
    parameters = sum(m.rank_out * (m.shape[0] + math.prod(m.shape[1:])) for m in modules)
    return CombineReport(
        operation="combine", output=str(output), method=options.method, format=to, device=str(device),
        inputs=inputs, modules=modules, partial=partial, parameters=parameters, bytes=size,
        seconds=time.perf_counter() - started, notes=notes, checksums=digests,
    )  # fmt: skip
