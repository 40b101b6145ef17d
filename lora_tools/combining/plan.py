"""Which input modules feed each output module of a combination, checked to agree (pure: names and shapes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..adapters.model import Adapter, LoraModule
from ..errors import IncompatibleError
from ..planning.shapes import module_delta_shape

__all__ = ["Member", "ModuleGroup", "factor_layout_shape", "plan_combination"]


@dataclass(frozen=True)
class Member:
    adapter: int
    module: LoraModule
    shape: tuple[int, ...]  # ΔW in factor layout: rows = B's rows


@dataclass(frozen=True)
class ModuleGroup:
    """One output module and the input modules that feed it."""

    name: str
    component: str | None
    kind: str
    fan_in_fan_out: bool
    shape: tuple[int, ...]
    members: tuple[Member, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])


def factor_layout_shape(adapter: Adapter, module: LoraModule) -> tuple[int, ...]:
    """ΔW's shape in factor layout (B's rows first), from the factor shapes alone."""
    if module.variant == "lora":
        return (module.b_shape[0], *module.a_shape[1:])
    return tuple(module_delta_shape(adapter, module))


def plan_combination(adapters: Sequence[Adapter], names: Sequence[Callable[[LoraModule], str]]) -> list[ModuleGroup]:
    """Group the adapters' modules by output module and check they agree (headers only).

    Args:
        names: per adapter, the output module path of each of its modules.

    Raises:
        IncompatibleError: a module's ΔW shape, layer kind or layout differs between adapters
            (adapters for different bases), every mismatch listed.
    """
    grouped: dict[tuple[str | None, str], list[Member]] = {}
    for index, (adapter, name_of) in enumerate(zip(adapters, names, strict=True)):
        for module in adapter.modules:
            member = Member(index, module, factor_layout_shape(adapter, module))
            grouped.setdefault((module.component, name_of(module)), []).append(member)
    problems, groups = [], []
    for (component, name), members in grouped.items():
        first = members[0]
        for other in members[1:]:
            described = f"{name}: adapter {first.adapter + 1} has"
            if math.prod(other.shape) != math.prod(first.shape) or other.shape[0] != first.shape[0]:
                problems.append(f"{described} ΔW {list(first.shape)}, adapter {other.adapter + 1} {list(other.shape)}")
            elif other.module.kind != first.module.kind or other.module.fan_in_fan_out != first.module.fan_in_fan_out:
                problems.append(f"{described} a {first.module.kind} layer, adapter {other.adapter + 1} a different one")
        shape = max((m.shape for m in members), key=len)
        groups.append(
            ModuleGroup(name, component, first.module.kind, first.module.fan_in_fan_out, shape, tuple(members))
        )
    if problems:
        raise IncompatibleError(
            f"{len(problems)} module(s) differ between the adapters (made for different base models?)", problems
        )
    return groups
