"""Adapters re-spelled between PEFT and kohya: LoRA factors copied bit for bit, variants re-factorised.

LoRA factors are copied exactly and alpha is carried (kohya scale = alpha/rank, so
PEFT's rsLoRA or pattern scales become kohya alphas), unless `bake_alpha` folds the
scale into B. Variants that are not low-rank products (LoHa, LoKr, Tucker) are
materialised (ΔW = s·f(factors)) and re-factorised to a rank by truncated SVD,
which is an approximation, and the report says how close.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..adapters import kohya, peft
from ..adapters.model import Adapter, LoraModule, ModuleFactors
from ..adapters.report import ModuleExtraction
from ..errors import IncompatibleError, InvalidInputError, UnsupportedError
from ..io.checkpoint import open_checkpoint
from ..io.spool import Spool
from ..lowrank.rank import RankRule
from ..lowrank.svd import factorize
from ..ops import variant_delta
from ..planning.compatibility import compatibility_problems
from ..planning.shapes import module_delta_shape
from ..planning.targets import Targets
from .tuners import is_tuner, tuner_factors

__all__ = ["component_of", "refuse_extras", "to_kohya", "to_peft", "parameter_count"]


def component_of(adapter: Adapter, component: str | None) -> str | None:
    """The pipeline component to take: the one asked for, or the adapter's only one."""
    found = {m.component for m in adapter.modules}
    if component is not None:
        return component
    if len(found) == 1:
        return next(iter(found))
    raise InvalidInputError(
        f"{adapter.path} spans components {', '.join(sorted(str(c) for c in found))}; pass --component to pick one"
    )


def refuse_extras(adapter: Adapter, target: str) -> None:
    """Refuse what a LoRA file of `target` cannot carry: replacements, lora_B biases, kohya embeddings."""
    if adapter.replacements:
        raise UnsupportedError(f"{adapter.path}: modules_to_save / trainable tokens cannot be carried by {target} LoRA")
    bias = [m.name for m in adapter.modules if m.bias_key is not None and m.variant != "ia3"]  # IA3: conversion.tuners
    if bias:
        raise UnsupportedError(f"{adapter.path}: lora_B.bias ({bias[0]}) has no {target} spelling")
    embeddings = [m.name for m in adapter.modules if m.kind == "embedding"]
    if embeddings and target == "kohya":
        raise UnsupportedError(f"{adapter.path}: embedding LoRA ({embeddings[0]}) has no kohya spelling")


def to_kohya(adapter: Adapter, component: str | None, spool: Spool, bake_alpha: bool, modules_out: list) -> None:
    """Spool every (plain LoRA) module under kohya's keys, factors copied bit for bit, alpha carried or baked."""
    for module in adapter.modules:
        if module.variant != "lora":
            raise UnsupportedError(
                f"{module.name}: {module.variant} modules are written to kohya files as they are read"
            )
        prefix = kohya.KOHYA_PREFIX_FOR.get(module.component or component or "")
        if prefix is None:
            raise InvalidInputError(f"{adapter.path}: pass --component (unet, text_encoder, …) to name kohya modules")
        name = kohya.kohya_name(prefix, module.name)
        down, up = adapter.read(module.a_key), adapter.read(module.b_key)
        if module.fan_in_fan_out:
            raise UnsupportedError(f"{module.name}: fan_in_fan_out (Conv1D) layers have no kohya spelling")
        alpha = module.scale * module.rank
        if bake_alpha:
            up, alpha = (up.double() * module.scale).to(up.dtype), float(module.rank)
        if module.magnitude_key is not None and module.dora_axis != "out":
            raise UnsupportedError(f"{module.name}: per-input DoRA scales cannot be converted")
        dora = adapter.read(module.magnitude_key) if module.magnitude_key is not None else None
        kohya.spool_module(spool, ModuleFactors(name, down, up, alpha, dora))
        modules_out.append(
            ModuleExtraction(name, module.rank, 1.0, 0.0, "copied", tuple(up.shape[:1]) + tuple(down.shape[1:]))
        )


def to_peft(
    adapter: Adapter, base_path: Path | None, component: str | None, spool: Spool, rule: RankRule | None,
    bake_alpha: bool, modules_out: list, ranks: dict, alphas: dict, workers: int | None = None,
) -> tuple[bool, bool]:  # fmt: skip
    """Write PEFT keys for every module; return (fan_in_fan_out, use_dora)."""
    import torch

    from ..compute.workers import ModuleWorkers

    needs_names = any(m.kohya_name for m in adapter.modules)
    targets = base = None
    if needs_names or (base_path is not None and any(is_tuner(m) for m in adapter.modules)):
        if base_path is None:
            raise InvalidInputError(
                f"{adapter.path}: kohya names are underscored module paths; pass --base so they can be matched "
                "to the base's dotted module names"
            )
        folder = base_path / component if component and (base_path / component).is_dir() else base_path
        base = open_checkpoint(folder)
        problems = compatibility_problems(adapter, base.tensors, base.config)
        if problems:
            raise IncompatibleError(f"{adapter.path} does not fit {folder}", problems)
        targets = Targets(base.tensors)
    use_dora = False

    def factors(module: LoraModule, workspace) -> tuple:
        """(path, A, B, alpha, rank, error, method) of one module (re-factorising runs on a worker)."""
        path = targets.find(module) if targets is not None else module.name
        if is_tuner(module):  # PEFT's other tuners: exact where they are LoRAs, else their change re-factorised
            return path, *tuner_factors(adapter, module, base, path, rule)
        if module.variant == "lora":
            down, up, alpha = adapter.read(module.a_key), adapter.read(module.b_key), module.alpha
            if adapter.use_rslora:
                alpha = module.scale * module.rank
            if bake_alpha:
                up, alpha = (up.double() * module.scale).to(up.dtype), float(module.rank)
            return path, down, up, alpha, module.rank, 0.0, "copied"
        if rule is None:
            raise InvalidInputError(f"{module.name} is {module.variant}: pass --rank to re-factorise it as LoRA")
        # a LoHa on a conv weight builds ΔW flattened; the base says the real layout
        weight_shape = (
            tuple(base.tensors[f"{path}.weight"].shape) if base is not None else module_delta_shape(adapter, module)
        )
        delta = variant_delta(module, lambda key: adapter.read(key).double(), torch.Size(weight_shape)) * module.scale
        matrix = delta.reshape(delta.shape[0], -1)
        b, a, method = factorize(matrix, rule, "auto")
        error = float((matrix - b @ a).norm() / matrix.norm()) if matrix.norm() > 0 else 0.0
        module_rank = a.shape[0]
        down = a.reshape(module_rank, *weight_shape[1:]).float()
        up = b.reshape(weight_shape[0], module_rank, *([1] * (len(weight_shape) - 2))).float()
        return path, down, up, float(module_rank), module_rank, error, f"re-factorised ({method})"

    with ModuleWorkers([torch.device("cpu")], workers) as pool:
        for module, (path, down, up, alpha, module_rank, error, method) in zip(
            adapter.modules, pool.map(factors, adapter.modules), strict=True
        ):
            _spool_peft_module(adapter, module, spool, ModuleFactors(path, down, up, float(alpha), kind=module.kind))
            use_dora = use_dora or module.magnitude_key is not None
            ranks[path], alphas[path] = module_rank, float(alpha)
            modules_out.append(
                ModuleExtraction(
                    path, module_rank, 1 - error * error, error, method, tuple(up.shape[:1]) + tuple(down.shape[1:])
                )
            )
    return any(m.fan_in_fan_out for m in adapter.modules), use_dora


def _spool_peft_module(adapter: Adapter, module: LoraModule, spool: Spool, factors: ModuleFactors) -> None:
    if module.magnitude_key is not None and module.dora_axis != "out":
        raise UnsupportedError(f"{module.name}: per-input dora_scale has no PEFT equivalent")
    magnitude = adapter.read(module.magnitude_key) if module.magnitude_key is not None else None
    peft.spool_module(spool, replace(factors, magnitude=magnitude))


def parameter_count(module: ModuleExtraction) -> int:
    """The parameters of a written LoRA module: rank × (out + in)."""
    out, *rest = module.shape
    inner = 1
    for size in rest:
        inner *= size
    return module.rank * (out + inner)
