"""The arithmetic of PEFT's tuners other than LoRA, by variant: ΔW for the additive ones, W → W' for the others.

`adapters.tuners` reads a tuner's files into modules whose `variant` names a row here.
LoHa and LoKr are not here: their ΔW is LyCORIS' (`ops.variant_delta`). The merge
(`merging.arithmetic`) calls `tuner_delta` through `ops.variant_delta` for additive
tuners, and `transform` for the multiplicative ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..adapters.model import LoraModule
from ..adapters.tuners import TUNERS, transforms_weight, tuner_delta_shape
from ..errors import InvalidInputError
from . import additive, transforms

__all__ = ["DELTAS", "TRANSFORMS", "is_tuner_delta", "is_transform", "tuner_delta", "transform", "tuner_change"]

#: variant → ΔW(factor by role, params, base weight shape).
DELTAS: dict[str, Callable] = {
    "adalora": additive.adalora,
    "vera": additive.vera,
    "fourierft": additive.fourierft,
    "miss": additive.miss,
    "randlora": additive.randlora,
    "shira": additive.shira,
    "c3a": additive.c3a,
    "paca": additive.paca,
}

#: variant → W'(factor by role, params, W, inverse=…): the multiplicative tuners.
TRANSFORMS: dict[str, Callable] = {
    "ia3": transforms.ia3,
    "oft": transforms.oft,
    "boft": transforms.boft,
    "hra": transforms.hra,
    "miss": transforms.miss_bat,
}


def is_transform(module: LoraModule) -> bool:
    """True when the module's merge transforms W rather than adding ΔW (MiSS only with its "bat" init)."""
    return transforms_weight(module)


def is_tuner_delta(module: LoraModule) -> bool:
    return module.variant in DELTAS and not is_transform(module)


def _by_role(module: LoraModule, fetch: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """A module's tensors by role, in fp64: a tuner's own tensors are small, and computing its ΔW or
    transform exactly makes the one rounding, to the output, the only one."""
    keys = dict(module.factors)
    return lambda role: fetch(keys[role]).to(torch.float64)


def tuner_delta(module: LoraModule, fetch: Callable[[str], torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW of an additive tuner's module in fp64, scale included, laid out like the base weight of `shape`.

    Raises:
        InvalidInputError: the module's tensors hold values that cannot be its (PaCA's columns out of range).
    """
    try:
        return DELTAS[module.variant](_by_role(module, fetch), dict(module.params), torch.Size(shape))
    except additive.UnfitTensors as exc:
        raise InvalidInputError(f"{module.name}: {exc}") from exc


def transform(
    module: LoraModule, fetch: Callable[[str], torch.Tensor], weight: torch.Tensor, *, inverse: bool, bias: bool = False
) -> torch.Tensor:
    """W' of a multiplicative tuner's module in fp64 (W back from W' with `inverse`); `bias`: W is the
    layer's bias (IA3)."""
    factor, params = _by_role(module, fetch), dict(module.params)
    weight = weight.to(torch.float64)
    if module.variant == "ia3":
        return transforms.ia3(factor, params, weight, inverse=inverse, bias=bias, name=module.name)
    if module.variant == "oft":
        return transforms.oft(factor, params, weight, inverse=inverse, embedding=module.kind == "embedding")
    return TRANSFORMS[module.variant](factor, params, weight, inverse=inverse)


def tuner_change(
    module: LoraModule, fetch: Callable[[str], torch.Tensor], weight: torch.Tensor | None, shapes: dict
) -> torch.Tensor:
    """W' − W of a tuner module in fp64, for statistics: ΔW for additive tuners, the transform's effect
    on `weight` for the others.

    Raises:
        InvalidInputError: the change depends on the base weight (a transform, or a ΔW whose shape only
            the layer gives) and `weight` is None.
    """
    if weight is None:
        shape = None if is_transform(module) else tuner_delta_shape(module, shapes)
        if shape is None:
            peft_type = next(t.peft_type for t in TUNERS.values() if t.variant == module.variant)
            raise InvalidInputError(
                f"{module.name}: a {peft_type} module's change depends on the base layer it adapts; pass --base"
            )
        return tuner_delta(module, fetch, torch.Size(shape))
    weight = weight.to(torch.float64)
    if is_transform(module):
        return transform(module, fetch, weight, inverse=False) - weight
    return tuner_delta(module, fetch, weight.shape)
