"""`inspect`: what an adapter or checkpoint holds, from headers alone, and whether they fit."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..adapters.inits import describe_init
from ..adapters.model import Adapter
from ..adapters.registry import is_adapter, read_adapter
from ..io.checkpoint import Checkpoint, component_aliases, open_checkpoint, open_components
from ..layouts.diffusion import describe_layout
from ..planning.compatibility import compatibility_problems, unknown_key_problem
from ..planning.targets import Targets, head_name, tied_embedding, with_tied_head

__all__ = ["inspect", "AdapterReport", "CheckpointReport", "ModuleReport", "Validation"]


@dataclass(frozen=True)
class ModuleReport:
    name: str
    target: str
    type: str
    variant: str
    component: str | None
    rank: int
    alpha: float
    scale: float
    dora: bool
    bias: bool
    rule: str = ""
    params: dict = field(default_factory=dict)  # a PEFT tuner's per-module settings (OFT's coft, IA3's feedforward…)


@dataclass(frozen=True)
class Validation:
    """The result of checking an adapter against a base: `problems` is empty when it fits."""

    base: str
    problems: list[str]

    @property
    def compatible(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class AdapterReport:
    path: str
    format: str
    base_model: str | None
    num_parameters: int
    total_bytes: int
    dtypes: dict[str, int]
    use_rslora: bool
    use_dora: bool
    modules: list[ModuleReport]
    replacements: list[dict]
    unknown_keys: list[str]
    metadata: dict[str, str]
    validation: Validation | None = None
    kind: str = field(default="adapter")
    #: PEFT adapters: `init_lora_weights` and what it means for a merge (`adapters.inits.describe_init`)
    init: dict | None = None
    tuner: str | None = None  # PEFT's peft_type for its tuners other than LoRA (IA3, OFT, VERA…)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.validation is not None:
            data["validation"]["compatible"] = self.validation.compatible
        return data


@dataclass(frozen=True)
class CheckpointReport:
    path: str
    num_tensors: int
    num_parameters: int
    total_bytes: int
    dtypes: dict[str, int]
    files: list[str]
    architecture: str | None
    lm_head: str
    metadata: dict[str, str]
    kind: str = field(default="checkpoint")
    #: method, formats (with tensor counts) and names of quantized weights; or `unsupported` with the reason
    quantization: dict | None = None
    layout: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _target_name(module: str) -> str:
    """The module's own name as people say it: `to_q`; `to_out` for `to_out.0` (the Linear of diffusers'
    [Linear, Dropout] list); `net.2` for `ff.net.2` (a list index names nothing alone)."""
    parent, _, leaf = module.rpartition(".")
    if not leaf.isdigit() or not parent:
        return leaf
    owner = parent.rpartition(".")[2]
    return owner if leaf == "0" else f"{owner}.{leaf}"


def _adapter_report(
    adapter: Adapter, base_path: str | None, components: dict | None, renames: Sequence[str] = ()
) -> AdapterReport:
    aliases = component_aliases(components) if components else {}
    disk, disk_problems = _on_disk(adapter, components, renames)

    def part(module_component: str | None):
        return components.get(None) or components.get(aliases.get(module_component, module_component))

    modules = []
    for module in adapter.modules:
        name = module.name
        checkpoint = part(module.component) if components else None
        if module.name in disk.mapped:
            name = disk.mapped[module.name]
        elif checkpoint is not None:
            targets = Targets(with_tied_head(checkpoint.tensors, checkpoint.config))
            located = targets.located(module)
            name = located.describe() if located is not None else targets.find(module) or module.name
        modules.append(
            ModuleReport(
                name=name,
                target=_target_name(name),
                type=module.kind,
                variant=module.variant,
                component=module.component,
                **dict(
                    zip(
                        ("rank", "alpha", "scale"),
                        disk.per_expert.get(module.name, (module.rank, module.alpha, module.scale)),
                        strict=True,
                    )
                ),
                dora=module.dora,
                bias=module.bias_key is not None,
                rule=disk.rules.get(module.name, ""),
                params=dict(module.params),
            )
        )
    validation = None
    if components is not None:
        if None in components:
            checkpoint = components[None]
            tensors, problems = _quantized_view(checkpoint)
            problems += disk_problems or compatibility_problems(disk.adapter, tensors, checkpoint.config)
        else:
            problems = [unknown_key_problem(key) for key in adapter.unknown_keys]
            for component in sorted(adapter.components, key=str):
                checkpoint = part(component)
                if checkpoint is None:
                    problems.append(
                        f"{component or 'modules without a component prefix'}: the pipeline has no such component"
                    )
                    continue
                found = compatibility_problems(adapter.restricted(component), checkpoint.tensors, checkpoint.config)
                problems += [f"{component}: {p}" for p in found]
        validation = Validation(str(base_path), problems + _nonfinite_problems(adapter))
    return AdapterReport(
        path=str(adapter.path),
        format=adapter.format,
        base_model=adapter.base_model,
        num_parameters=adapter.num_parameters,
        total_bytes=adapter.weights.total_bytes,
        dtypes=dict(Counter(info.dtype for info in adapter.tensors.values())),
        use_rslora=adapter.use_rslora,
        use_dora=any(m.dora for m in adapter.modules),
        modules=modules,
        replacements=[
            {"target": r.target, "key": r.key, "origin": r.origin, "rows": list(r.rows) if r.rows else None}
            for r in adapter.replacements
        ],
        unknown_keys=list(adapter.unknown_keys),
        metadata=dict(adapter.metadata),
        validation=validation,
        init=describe_init(adapter.config) if "peft_type" in adapter.config else None,
        tuner=_tuner(adapter),
    )


def _tuner(adapter: Adapter) -> str | None:
    peft_type = adapter.config.get("peft_type") if adapter.format == "peft" else None
    return peft_type if peft_type not in (None, "LORA") else None


def _nonfinite_problems(adapter: Adapter) -> list[str]:
    import torch

    return [
        f"{key}: holds NaN or Inf"
        for key, info in adapter.tensors.items()
        if info.is_float and not bool(torch.isfinite(adapter.read(key)).all())
    ]


def _quantization(checkpoint: Checkpoint) -> dict | None:
    from ..errors import UnsupportedError
    from ..quant.layout import detect

    try:
        layout = detect(checkpoint.path, checkpoint.tensors, checkpoint.config)
    except UnsupportedError as exc:
        return {"unsupported": str(exc)}
    return layout.describe() if layout is not None else None


def _quantized_view(checkpoint: Checkpoint) -> tuple[dict, list[str]]:
    """The tensors as merging plans against them (quantized weights as one fp32 tensor), or why it cannot."""
    from ..errors import UnsupportedError
    from ..quant.layout import detect, planning_view

    try:
        return planning_view(checkpoint.tensors, detect(checkpoint.path, checkpoint.tensors, checkpoint.config)), []
    except UnsupportedError as exc:
        return checkpoint.tensors, [str(exc)]


def _checkpoint_report(checkpoint: Checkpoint) -> CheckpointReport:
    if head_name(checkpoint.config) in checkpoint.tensors:
        head = "present"
    elif tied_embedding(checkpoint.tensors, checkpoint.config) is not None:
        head = "tied"
    else:
        head = "absent"
    architectures = (checkpoint.config or {}).get("architectures") or [None]
    return CheckpointReport(
        path=str(checkpoint.path),
        num_tensors=len(checkpoint.tensors),
        num_parameters=checkpoint.num_parameters,
        total_bytes=checkpoint.total_bytes,
        dtypes=dict(Counter(info.dtype for info in checkpoint.tensors.values())),
        files=[f.name for f in checkpoint.files],
        architecture=architectures[0] if isinstance(architectures, list) else str(architectures),
        lm_head=head,
        metadata=dict(checkpoint.metadata),
        quantization=_quantization(checkpoint),
        layout=describe_layout(checkpoint.tensors),
    )


def _on_disk(adapter: Adapter, components: dict | None, renames: Sequence[str]):
    """The adapter in the base's on-disk names (a lone checkpoint only), and the problems found doing so."""
    from ..errors import IncompatibleError
    from ..layouts.transformers import parse_rename
    from ..planning.disk_names import DiskNames, to_disk_names

    if not components or None not in components:
        return DiskNames(adapter), []
    checkpoint = components[None]
    try:
        rules = [parse_rename(text) for text in renames]
        tensors, _ = _quantized_view(checkpoint)  # quantized experts are placed on their logical fp32 tensor
        return to_disk_names(adapter, tensors, checkpoint.config, rules), []
    except IncompatibleError as exc:
        return DiskNames(adapter), exc.problems


def inspect(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    alpha: float | None = None,
    revision: str | None = None,
    token: str | None = None,
    renames: Sequence[str] = (),
) -> AdapterReport | CheckpointReport:
    """Describe an adapter or a checkpoint (detected), reading headers only.

    Args:
        path: an adapter (any registered format) or a checkpoint.
        base: with an adapter, a base checkpoint to validate it against.
        alpha: lora_alpha for adapter files that do not record it.
        revision, token: for `path` or `base` given as Hub repo ids (`org/name`, or `org/name@revision`).
        renames: `REGEX=REPLACEMENT` rules for adapter module paths, as `merge` takes them.

    Returns:
        An `AdapterReport` (with `validation` when `base` is given) or a `CheckpointReport`.
    """
    from ..io.hub import resolve_input

    path = resolve_input(path, revision=revision, token=token)[0]
    base = resolve_input(base, revision=revision, token=token)[0] if base is not None else None
    if is_adapter(path):
        components = open_components(base) if base is not None else None
        return _adapter_report(read_adapter(path, alpha=alpha), base, components, renames)
    return _checkpoint_report(open_checkpoint(path))
