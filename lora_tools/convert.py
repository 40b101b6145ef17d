"""`convert`: PEFT ↔ kohya for LoRA, and LoHa / LoKr / Tucker → LoRA by re-factorising ΔW.

LoRA factors are copied bit for bit and alpha is carried (kohya scale = alpha/rank,
so PEFT's rsLoRA or pattern scales become kohya alphas), unless `bake_alpha`
folds the scale into B. Variants that are not low-rank products are
materialised (ΔW = s·f(factors)) and re-factorised to `rank` by truncated SVD,
which is an approximation, and the report says how close.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import CallableModule
from .adapters.reading import Adapter, LoraModule, read_adapter
from .errors import InvalidInputError, UnsupportedError
from .extraction import ExtractReport, ModuleExtraction, Spool, factorize, peft_adapter_config, write_adapter_config
from .io.checkpoint import open_checkpoint
from .io.hub import resolve_input
from .io.output import atomic_output, checksums
from .plan import Targets, compatibility_problems
from .rank import RankRule
from .serving import fit_to_base

__all__ = ["convert", "TARGET_FORMATS"]

TARGET_FORMATS = ("peft", "kohya", "gguf", "mlx", "diffusers")
_KOHYA_PREFIX_FOR = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te",
                     "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}  # fmt: skip


def _component_of(adapter: Adapter, component: str | None) -> str | None:
    found = {m.component for m in adapter.modules}
    if component is not None:
        return component
    if len(found) == 1:
        return next(iter(found))
    raise InvalidInputError(
        f"{adapter.path} spans components {', '.join(sorted(str(c) for c in found))}; pass --component to pick one"
    )


def _refuse_extras(adapter: Adapter, target: str) -> None:
    if adapter.replacements:
        raise UnsupportedError(f"{adapter.path}: modules_to_save / trainable tokens cannot be carried by {target} LoRA")
    bias = [m.name for m in adapter.modules if m.bias_key is not None]
    if bias:
        raise UnsupportedError(f"{adapter.path}: lora_B.bias ({bias[0]}) has no {target} spelling")
    embeddings = [m.name for m in adapter.modules if m.kind == "embedding"]
    if embeddings and target == "kohya":
        raise UnsupportedError(f"{adapter.path}: embedding LoRA ({embeddings[0]}) has no kohya spelling")


def _to_kohya(adapter: Adapter, component: str | None, spool: Spool, bake_alpha: bool, modules_out: list) -> None:
    import torch

    for module in adapter.modules:
        if module.variant != "lora":
            raise UnsupportedError(
                f"{module.name}: {module.variant} modules are written to kohya files as they are read"
            )
        prefix = _KOHYA_PREFIX_FOR.get(module.component or component or "")
        if prefix is None:
            raise InvalidInputError(f"{adapter.path}: pass --component (unet, text_encoder, …) to name kohya modules")
        name = f"{prefix}_{module.name.replace('.', '_')}"
        down, up = adapter.read(module.a_key), adapter.read(module.b_key)
        if module.fan_in_fan_out:
            raise UnsupportedError(f"{module.name}: fan_in_fan_out (Conv1D) layers have no kohya spelling")
        alpha = module.scale * module.rank
        if bake_alpha:
            up, alpha = (up.double() * module.scale).to(up.dtype), float(module.rank)
        spool.add(f"{name}.lora_down.weight", down)
        spool.add(f"{name}.lora_up.weight", up)
        spool.add(f"{name}.alpha", torch.tensor(alpha, dtype=torch.float32))
        if module.magnitude_key is not None:
            if module.dora_axis != "out":
                raise UnsupportedError(f"{module.name}: per-input DoRA scales cannot be converted")
            spool.add(f"{name}.dora_scale", adapter.read(module.magnitude_key).reshape(-1, 1))
        modules_out.append(
            ModuleExtraction(name, module.rank, 1.0, 0.0, "copied", tuple(up.shape[:1]) + tuple(down.shape[1:]))
        )


def _to_peft(
    adapter: Adapter, base_path: Path | None, component: str | None, spool: Spool, rank: int | None,
    bake_alpha: bool, modules_out: list, ranks: dict, alphas: dict, workers: int | None = None,
) -> tuple[bool, bool]:  # fmt: skip
    """Write PEFT keys for every module; return (fan_in_fan_out, use_dora)."""
    import torch

    from .compute.workers import ModuleWorkers
    from .ops import variant_delta

    needs_names = any(m.kohya_name for m in adapter.modules)
    targets = base = None
    if needs_names:
        if base_path is None:
            raise InvalidInputError(
                f"{adapter.path}: kohya names are underscored module paths; pass --base so they can be matched "
                "to the base's dotted module names"
            )
        folder = base_path / component if component and (base_path / component).is_dir() else base_path
        base = open_checkpoint(folder)
        problems = compatibility_problems(adapter, base.tensors, base.config)
        if problems:
            from .errors import IncompatibleError

            raise IncompatibleError(f"{adapter.path} does not fit {folder}", problems)
        targets = Targets(base.tensors)
    use_dora = False

    def factors(module: LoraModule, workspace) -> tuple:
        """(path, A, B, alpha, rank, error, method) of one module (re-factorising runs on a worker)."""
        path = targets.find(module) if targets is not None else module.name
        if module.variant == "lora":
            down, up, alpha = adapter.read(module.a_key), adapter.read(module.b_key), module.alpha
            if adapter.use_rslora:
                alpha = module.scale * module.rank
            if bake_alpha:
                up, alpha = (up.double() * module.scale).to(up.dtype), float(module.rank)
            return path, down, up, alpha, module.rank, 0.0, "copied"
        if rank is None:
            raise InvalidInputError(f"{module.name} is {module.variant}: pass --rank to re-factorise it as LoRA")
        # a LoHa on a conv weight builds ΔW flattened; the base says the real layout
        weight_shape = (
            tuple(base.tensors[f"{path}.weight"].shape) if base is not None else _delta_shape(adapter, module)
        )
        delta = variant_delta(module, lambda key: adapter.read(key).double(), torch.Size(weight_shape)) * module.scale
        matrix = delta.reshape(delta.shape[0], -1)
        b, a, method = factorize(matrix, RankRule(rank=rank), "auto")
        error = float((matrix - b @ a).norm() / matrix.norm()) if matrix.norm() > 0 else 0.0
        module_rank = a.shape[0]
        down = a.reshape(module_rank, *weight_shape[1:]).float()
        up = b.reshape(weight_shape[0], module_rank, *([1] * (len(weight_shape) - 2))).float()
        return path, down, up, float(module_rank), module_rank, error, f"re-factorised ({method})"

    with ModuleWorkers([torch.device("cpu")], workers) as pool:
        for module, (path, down, up, alpha, module_rank, error, method) in zip(
            adapter.modules, pool.map(factors, adapter.modules), strict=True
        ):
            _spool_peft_module(adapter, module, path, spool, down, up)
            use_dora = use_dora or module.magnitude_key is not None
            ranks[path], alphas[path] = module_rank, float(alpha)
            modules_out.append(
                ModuleExtraction(
                    path, module_rank, 1 - error * error, error, method, tuple(up.shape[:1]) + tuple(down.shape[1:])
                )
            )
    return any(m.fan_in_fan_out for m in adapter.modules), use_dora


def _spool_peft_module(adapter: Adapter, module: LoraModule, path: str, spool: Spool, down, up) -> None:
    key_a, key_b = f"base_model.model.{path}.lora_A.weight", f"base_model.model.{path}.lora_B.weight"
    if module.kind == "embedding":
        key_a, key_b = f"base_model.model.{path}.lora_embedding_A", f"base_model.model.{path}.lora_embedding_B"
    spool.add(key_a, down)
    spool.add(key_b, up)
    if module.magnitude_key is not None:
        if module.dora_axis != "out":
            raise UnsupportedError(f"{module.name}: per-input dora_scale has no PEFT equivalent")
        spool.add(f"base_model.model.{path}.lora_magnitude_vector", adapter.read(module.magnitude_key).reshape(-1))


def _delta_shape(adapter: Adapter, module: LoraModule) -> tuple[int, ...]:
    from .plan import variant_delta_shape

    shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
    if module.variant == "tucker":
        shapes.update({"up": module.b_shape, "down": module.a_shape})
    shape = variant_delta_shape(module, shapes)
    if shape is None:
        raise InvalidInputError(f"{module.name}: the {module.variant} factors do not make a weight")
    return shape


def convert(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str,
    base: str | os.PathLike | None = None,
    component: str | None = None,
    rank: int | None = None,
    bake_alpha: bool = False,
    alpha: float | None = None,
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    drop_unsupported: bool = False,
    workers: int | None = None,
    naming: str | None = None,
) -> ExtractReport:
    """Convert an adapter between PEFT and kohya spellings.

    Args:
        adapter: any readable adapter (PEFT, kohya, LyCORIS, diffusers).
        output: a PEFT folder (`to="peft"`) or a `.safetensors` file (`to="kohya"`).
        base: needed to turn kohya's underscored names into PEFT's dotted ones.
        component: which pipeline component to take (or to name, for kohya output).
        rank: LoHa / LoKr / Tucker modules are re-factorised to this rank (an approximation).
        bake_alpha: fold the scale into B and set alpha = rank, instead of carrying alpha.
        drop_unsupported: for `to="gguf"|"mlx"`, leave out (and report) what the target cannot carry.
        workers: modules re-factorised at once, one core each (default: the usable cores);
            the output is byte-identical for any number.
        naming: for diffusion models, "diffusers" or "original" (LDM / BFL / SD3) module names; fused and
            split projections are converted exactly (see `renaming`). `to="diffusers"` writes a diffusers
            LoRA file (`transformer.….lora_A.weight`, scale folded into B) and defaults to "diffusers".

    Returns:
        An `ExtractReport` listing each module, how it was carried, and any approximation error.
    """
    started = time.perf_counter()
    if to not in TARGET_FORMATS:
        raise InvalidInputError(f"--to must be one of {', '.join(TARGET_FORMATS)}, got {to!r}")
    if rank is not None and rank <= 0:
        raise InvalidInputError(f"--rank must be a positive integer, got {rank}")
    if naming is not None or to == "diffusers":
        from .layouts.renaming_io import convert_naming

        return convert_naming(adapter, output, to=to, naming=naming or "diffusers", base=base, alpha=alpha,
                              force=force, checksum=checksum, revision=revision, token=token)  # fmt: skip
    if to in ("gguf", "mlx"):
        from .serving.export import ExportOptions, export

        options = ExportOptions(to, base, alpha, bake_alpha, drop_unsupported, force, checksum, revision, token)
        return export(adapter, output, options)
    output = Path(output)
    if to == "kohya" and output.suffix != ".safetensors":
        raise InvalidInputError(
            f"kohya adapters are single files: give an --output ending in .safetensors, not {output}"
        )
    adapter_local, _ = resolve_input(adapter, revision=revision, token=token)
    base_local = resolve_input(base, revision=revision, token=token)[0] if base is not None else None
    source = fit_to_base(read_adapter(adapter_local, alpha=alpha), base_local)
    if source.unknown_keys:
        raise InvalidInputError(
            f"{source.path}: keys lora_tools does not understand: {', '.join(source.unknown_keys[:5])}"
        )
    _refuse_extras(source, to)
    chosen = _component_of(source, component)
    if len({m.component for m in source.modules}) > 1:
        source = source.restricted(chosen)
    modules: list[ModuleExtraction] = []
    inputs = [source.path] + ([base_local] if base_local is not None else [])
    with atomic_output(output, is_dir=to == "peft", force=force, inputs=inputs) as target:
        scratch = target / ".factors.spool" if to == "peft" else target.parent / f".{target.name}.spool"
        spool = Spool(scratch)
        try:
            if to == "kohya":
                _to_kohya(source, chosen, spool, bake_alpha, modules)
                size = spool.finish(target, metadata=_kohya_metadata(source, modules))
            else:
                ranks: dict[str, int] = {}
                alphas: dict[str, float] = {}
                fan_in_fan_out, use_dora = _to_peft(
                    source, base_local, chosen, spool, rank, bake_alpha, modules, ranks, alphas, workers
                )
                size = spool.finish(target / "adapter_model.safetensors")
                config = peft_adapter_config(
                    ranks, alphas, base_model=source.base_model, fan_in_fan_out=fan_in_fan_out, modules_to_save=[],
                    extra={"use_dora": use_dora},
                )  # fmt: skip
                write_adapter_config(target, config)
        finally:
            scratch.unlink(missing_ok=True)
        digests = checksums(target) if checksum else None
        if digests is not None and to == "kohya":
            digests = {output.name: digests[target.name]}
    if progress is not None:
        progress(len(modules), len(modules))
    return ExtractReport(
        operation=f"convert to {to}",
        output=str(output),
        device="cpu",
        modules=modules,
        skipped=[],
        unchanged=[],
        changed_1d=[],
        modules_to_save=[],
        parameters=sum(_numel(m) for m in modules),
        bytes=size,
        full_delta_parameters=source.num_parameters,
        seconds=time.perf_counter() - started,
        notes=[
            f"{m.name}: re-factorised as rank-{m.rank} LoRA, an approximation (relative error {m.relative_error:.3g})"
            for m in modules
            if m.method.startswith("re-")
        ],
        checksums=digests,
    )


def _numel(module: ModuleExtraction) -> int:
    out, *rest = module.shape
    inner = 1
    for size in rest:
        inner *= size
    return module.rank * (out + inner)


def _kohya_metadata(source: Adapter, modules: list[ModuleExtraction]) -> dict[str, str]:
    metadata = {k: v for k, v in source.metadata.items() if k != "format"}
    ranks = sorted({m.rank for m in modules})
    metadata.update(
        {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic"}
    )
    if source.base_model:
        metadata.setdefault("ss_sd_model_name", source.base_model)
    return metadata


sys.modules[__name__].__class__ = CallableModule  # `lora_tools.convert(...)` even once this module is imported
