"""The shapes an adapter module's factors must have, and the ΔW its variant builds (pure, from shapes alone)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..adapters.model import Adapter, LoraModule
from ..errors import InvalidInputError

__all__ = ["expected_factor_shapes", "out_features", "variant_delta_shape", "module_delta_shape", "fits"]


def expected_factor_shapes(module: LoraModule, weight_shape: tuple[int, ...]) -> tuple[tuple, tuple] | None:
    """The A and B shapes the base weight demands, or None when the layouts cannot match."""
    r = module.rank
    if module.kind == "embedding":
        if len(weight_shape) != 2:
            return None
        num, dim = weight_shape
        return (r, num), (dim, r)
    if module.kind == "conv":
        if len(weight_shape) < 3:
            return None
        out, rest = weight_shape[0], weight_shape[1:]
        return (r, *rest), (out, r, *([1] * (len(weight_shape) - 2)))
    if len(weight_shape) != 2:
        return None
    out, inp = (weight_shape[1], weight_shape[0]) if module.fan_in_fan_out else weight_shape
    return (r, inp), (out, r)


def out_features(module: LoraModule, weight_shape: tuple[int, ...]) -> int:
    if module.kind == "embedding":
        return weight_shape[1]
    return weight_shape[1] if module.fan_in_fan_out else weight_shape[0]


def variant_delta_shape(module: LoraModule, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape of ΔW a Tucker / LoHa / LoKr module builds, from its factor shapes alone."""
    try:
        if module.variant == "experts":
            a, b = shapes["A"], shapes["B"]
            inner_outer = (a[1], b[0]) if module.fan_in_fan_out else (b[0], a[1])
            return (a[0] // module.rank, *inner_outer)
        if module.variant == "tucker":
            up, mid, down = shapes["up"], shapes["mid"], shapes["down"]
            return (up[0], down[1], *mid[2:])
        if module.variant == "loha":
            if "t1" in shapes:
                return (shapes["w1a"][1], shapes["w1b"][1], *shapes["t1"][2:])
            return (shapes["w1a"][0], math.prod(shapes["w1b"][1:]))
        if module.variant == "full":
            return tuple(shapes["diff"]) if "diff" in shapes else None
        if module.variant == "lokr":
            w1 = shapes["k1"] if "k1" in shapes else (shapes["k1a"][0], shapes["k1b"][1])
            if "k2" in shapes:
                w2 = shapes["k2"]
            elif "kt2" in shapes:
                w2 = (shapes["k2a"][1], shapes["k2b"][1], *shapes["kt2"][2:])
            else:
                w2 = (shapes["k2a"][0], *shapes["k2b"][1:])
            w1 = tuple(w1) + (1,) * (len(w2) - len(w1))
            return tuple(a * b for a, b in zip(w1, w2, strict=True))
    except (KeyError, IndexError, ValueError):
        return None
    return None


def fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """ΔW fits a weight of the same shape, or a conv weight it equals once flattened (LoHa on conv)."""
    return tuple(delta) == tuple(weight) or (
        len(delta) >= 2 and delta[0] == weight[0] and math.prod(delta) == math.prod(weight)
    )


def module_delta_shape(adapter: Adapter, module: LoraModule) -> tuple[int, ...]:
    """The shape of ΔW a LoRA variant module builds, from its factor shapes in `adapter` (Tucker: up/down too)."""
    shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
    if module.variant == "tucker":
        shapes.update({"up": module.b_shape, "down": module.a_shape})
    shape = variant_delta_shape(module, shapes)
    if shape is None:
        raise InvalidInputError(f"{module.name}: the {module.variant} factors do not make a weight")
    return shape
