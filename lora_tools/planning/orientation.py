"""Which way round a linear layer's weight is stored, decided by the base, never by the adapter's config alone (pure).

transformers' `Conv1D` (GPT-2 and kin) stores its weight in×out; `nn.Linear` stores out×in.
PEFT forces `fan_in_fan_out` to match the layer class it finds, whatever `adapter_config.json`
says, so a config that says `false` on GPT-2 still merges transposed in PEFT. Here the layer's
class comes from the base's config.json (its model type, sub-configs or architecture class,
via `peft_rules.CONV1D_MODULES`). Where the base does not say (no config.json, custom code),
the factor shapes decide a rectangular layer; a square layer is refused if anything hints
at `Conv1D` (the adapter's `fan_in_fan_out`, or a GPT-2 Conv1D module name), because both
orientations fit it and only one is right.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ..adapters.model import Adapter, LoraModule
from ..adapters.peft_rules import CONV1D_MODULES, conv1d_names, known_class
from ..io.safetensors_header import TensorInfo
from .shapes import expected_factor_shapes
from .targets import Targets, with_tied_head

__all__ = ["oriented", "UNKNOWN_ORIENTATION"]

#: Every module name some transformers model makes a `Conv1D`.
_ANY_CONV1D = frozenset().union(*CONV1D_MODULES.values())

UNKNOWN_ORIENTATION = (
    "square layer whose orientation the base does not establish (Conv1D stores in×out, nn.Linear out×in, and both "
    "fit): merge into a base folder with its config.json (model_type) so the layer class is known"
)


def oriented(adapter: Adapter, base: Mapping[str, TensorInfo], config: dict | None) -> tuple[Adapter, list[str]]:
    """The adapter with each plain LoRA linear module's `fan_in_fan_out` set as the base's layer class demands.

    Returns the re-oriented adapter and a problem line for each square layer whose orientation cannot be established.
    """
    targets = Targets(with_tied_head(base, config))
    conv1d, known = conv1d_names(config), known_class(config)
    modules, problems = [], []
    for module in adapter.modules:
        target = targets.find(module) if module.kind == "linear" and module.variant == "lora" else None
        weight = base.get(f"{target}.weight") if target is not None else None
        if weight is None or len(weight.shape) != 2:
            modules.append(module)
            continue
        leaf = target.rsplit(".", 1)[-1]
        if leaf in conv1d:
            transposed: bool | None = True
        elif known:
            transposed = False
        else:
            transposed = _by_shape(module, tuple(weight.shape), leaf)
        if transposed is None:
            problems.append(f"{module.name}: {UNKNOWN_ORIENTATION} (base {target}.weight {list(weight.shape)})")
            modules.append(module)
        else:
            modules.append(replace(module, fan_in_fan_out=transposed))
    if not problems and all(a is b for a, b in zip(modules, adapter.modules, strict=True)):
        return adapter, []
    return replace(adapter, modules=modules), problems


def _by_shape(module: LoraModule, weight: tuple[int, ...], leaf: str) -> bool | None:
    """The orientation the factor shapes allow, when the base's class is unknown; None when they cannot tell."""
    found = (tuple(module.a_shape), tuple(module.b_shape))
    fits = {
        flag: expected_factor_shapes(replace(module, fan_in_fan_out=flag), weight) == found for flag in (False, True)
    }
    if fits[False] and fits[True]:  # square: only a hint of Conv1D makes it doubtful
        return None if module.fan_in_fan_out or leaf in _ANY_CONV1D else False
    if fits[True] != fits[False]:
        return fits[True]
    return module.fan_in_fan_out  # fits neither: the shape check reports it as the config reads
