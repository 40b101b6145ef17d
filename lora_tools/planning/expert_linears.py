"""Per-expert Linear adapters merged into checkpoints that keep their experts fused on disk.

Per-expert models and older trainers name experts as Linear modules
(`…mlp.experts.3.gate_proj`, `up_proj`, `down_proj`), so their LoRAs come as
one A/B pair per expert and projection. gpt-oss keeps the experts fused on disk:
`mlp.experts.gate_up_proj` [E, H, 2I] with gate and up *interleaved* along the
last axis (transformers' `GptOssExperts._apply_gate` reads `gate_up[..., ::2]`
as gate and `gate_up[..., 1::2]` as up) and `down_proj` [E, I, H], both laid
out [E, in, out]. Expert e's ΔW_e = s·B_e·A_e (out × in) therefore lands
transposed in its slice: gate rows on the even columns, up rows on the odd.

The per-expert pairs are restacked, as pure index maps, into the fused-experts
LoRA PEFT's ParamWrapper would hold (A [E·R, in], B [out, E·R], the expert index
varying fastest along B's columns; `experts.fused_delta` multiplies it), one
module per fused parameter and distinct scale. Missing experts and ranks below
R are zero rows and columns, which add exactly nothing, and no value is rescaled,
so the planner and the arithmetic need nothing new and ΔW is rounded once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ..adapters.model import LoraModule
from ..io.safetensors_header import TensorInfo
from ..layouts.transformers import FusedExperts, Layout, to_disk_path

__all__ = ["Block", "Stacked", "ExpertLinears"]

_PER_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<part>[^.]+)$")


@dataclass(frozen=True)
class Block:
    """A stored adapter tensor placed at `rows` × `cols` of a stacked factor."""

    source: str
    rows: tuple[int, ...]
    cols: tuple[int, ...]


@dataclass(frozen=True)
class Stacked:
    """A virtual adapter factor of `shape`, zero except for its blocks."""

    shape: tuple[int, int]
    blocks: tuple[Block, ...]

    def build(self, read: Callable[[str], object]):
        import torch

        tensors = [read(block.source) for block in self.blocks]
        stacked = torch.zeros(self.shape, dtype=tensors[0].dtype)
        for block, tensor in zip(self.blocks, tensors, strict=True):
            stacked[torch.tensor(block.rows)[:, None], torch.tensor(block.cols)] = tensor.to(stacked.dtype)
        return stacked


@dataclass
class _Group:
    """Per-expert Linear modules landing on one fused parameter with one scale."""

    target: str
    spec: FusedExperts
    shape: tuple[int, int, int]
    scale: float
    members: list[tuple[int, int, LoraModule]] = field(default_factory=list)  # (expert, part index, module)


class ExpertLinears:
    """Collects per-expert Linear modules aimed at fused-on-disk experts; builds their stacked modules at the end."""

    def __init__(self, base: Mapping[str, TensorInfo], layout: Layout, model_type: str | None) -> None:
        self.base, self.layout, self.model_type = base, layout, model_type
        self.groups: dict[tuple[str, float], _Group] = {}
        self.rules: dict[str, str] = {}
        self.mapped: dict[str, str] = {}
        self.problems: list[str] = []
        self.views: dict[str, Stacked] = {}

    def _fused(self, disk_prefix: str) -> list[tuple[FusedExperts, str]]:
        found = []
        for spec in self.layout.experts:
            name = f"{disk_prefix}.{spec.param}"
            if not spec.parts and name in self.base and len(self.base[name].shape) == 3:
                found.append((spec, name))
        return found

    def claim(self, module: LoraModule, name: str) -> bool:
        """Take `module` (named `name` after --rename) when it is a per-expert Linear on fused-on-disk experts."""
        match = _PER_EXPERT.match(name)
        if match is None:
            return False
        disk_prefix = to_disk_path(match["experts"], self.layout.renames)[0]
        fused = self._fused(disk_prefix)
        if not fused:
            return False
        expert, part = int(match["index"]), match["part"]
        spec, target = next(((s, t) for s, t in fused if part in s.linear), (None, None))
        shapes = f"A {list(module.a_shape)}, B {list(module.b_shape)}"
        if spec is None:
            known = ", ".join(f"{t} {list(self.base[t].shape)} ← {'/'.join(s.linear)}" for s, t in fused)
            self.problems.append(
                f"{module.name} ({shapes}): a per-expert {part!r} has no known place in the fused experts ({known}); "
                f"how its rows split between them is ambiguous, so it is not merged"
            )
            return True
        why = self._misfit(module, spec, target, expert, part)
        if why:
            self.problems.append(f"{module.name} ({shapes}): {why}")
            return True
        group = self.groups.setdefault((target, module.scale), _Group(target, spec, self.base[target].shape,
                                                                      module.scale))  # fmt: skip
        group.members.append((expert, spec.linear.index(part), module))
        layout = "interleaved with " if spec.interleaved else "after "
        others = [p for p in spec.linear if p != part]
        placed = f"{target}[{expert}]" + (f" ({part} {layout}{'/'.join(others)})" if others else "")
        self.rules[module.name] = f"{self.model_type}: experts.N.{part} → {target} (fused on disk)"
        self.mapped[module.name] = placed
        return True

    def _misfit(self, module: LoraModule, spec: FusedExperts, target: str, expert: int, part: str) -> str | None:
        experts, inner, outer = _in_out(spec, self.base[target].shape)
        size = outer // len(spec.linear)
        if module.kind != "linear" or module.variant != "lora" or module.dora or module.bias_key or \
                module.fan_in_fan_out:  # fmt: skip
            return f"only plain LoRA pairs can go into the fused expert tensor {target}"
        if expert >= experts:
            return f"expert {expert} is beyond the {experts} experts of {target} {list(self.base[target].shape)}"
        if tuple(module.a_shape) != (module.rank, inner) or tuple(module.b_shape) != (size, module.rank):
            return (
                f"does not fit expert {expert}'s {part} slice of {target} {list(self.base[target].shape)}, "
                f"which needs A [r, {inner}] and B [{size}, r]"
            )
        return None

    def modules(self, a_key_prefix: str = "") -> list[LoraModule]:
        """One fused-experts module per (fused parameter, scale); their stacked factors land in `self.views`."""
        built = []
        for index, group in enumerate(self.groups.values()):
            built.append(self._stack(group, f"{a_key_prefix}{group.target}@per-expert-linear.{index}"))
        return built

    def _stack(self, group: _Group, key: str) -> LoraModule:
        experts, inner, outer = _in_out(group.spec, group.shape)
        parts = len(group.spec.linear)
        size = outer // parts
        ranks: dict[int, int] = {}
        for expert, _, module in group.members:
            ranks[expert] = ranks.get(expert, 0) + module.rank
        rank = max(ranks.values())
        offsets: dict[int, int] = {}
        a_blocks, b_blocks = [], []
        for expert, part, module in sorted(group.members, key=lambda m: (m[0], m[1])):
            start = offsets.get(expert, 0)
            offsets[expert] = start + module.rank
            span = range(start, start + module.rank)
            a_blocks.append(Block(module.a_key, tuple(expert * rank + k for k in span), tuple(range(inner))))
            rows = range(part, outer, parts) if group.spec.interleaved else range(part * size, (part + 1) * size)
            b_blocks.append(Block(module.b_key, tuple(rows), tuple(k * experts + expert for k in span)))
        a_key, b_key = f"{key}.lora_A", f"{key}.lora_B"
        self.views[a_key] = Stacked((experts * rank, inner), tuple(a_blocks))
        self.views[b_key] = Stacked((outer, experts * rank), tuple(b_blocks))
        first = group.members[0][2]
        return replace(
            first, name=group.target, a_key=a_key, b_key=b_key, a_shape=(experts * rank, inner),
            b_shape=(outer, experts * rank), rank=rank, alpha=group.scale * rank, scale=group.scale,
            variant="experts", fan_in_fan_out=group.spec.in_first, factors=(("A", a_key), ("B", b_key)),
        )  # fmt: skip


def _in_out(spec: FusedExperts, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(experts, in, out) of a fused parameter stored [E, in, out] (`in_first`) or [E, out, in]."""
    experts, first, second = shape
    return (experts, first, second) if spec.in_first else (experts, second, first)
