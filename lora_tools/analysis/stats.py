"""Per-module statistics of an adapter (`commands.stats` runs them over a whole adapter): how strongly each module changes its layer, and how much
of its rank it uses.

For plain LoRA (and rsLoRA) the numbers come from the exact spectrum of s·B·A without forming
it (see `spectrum.low_rank_spectrum`). LoHa, LoKr and Tucker modules are formed first (they
are not low-rank products). DoRA's effective change, m·(W+sBA)/‖W+sBA‖ − W, depends on the base
weight: with a base it is formed and measured; without one the statistics describe s·B·A and
the module says so in `notes`.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import asdict, dataclass, field

import torch

from ..adapters.model import Adapter, LoraModule
from ..adapters.tuners import tuner_of_variant
from ..ops import dora_norm, low_rank_pair, per_output, variant_delta
from ..planning.shapes import module_delta_shape
from ..planning.targets import Targets, with_tied_head
from ..tuners import tuner_change
from .spectrum import Spectrum, dense_spectrum, low_rank_spectrum

__all__ = [
    "ModuleStats",
    "StatsReport",
    "module_stats",
    "flag_outliers",
    "resize_parameters",
    "layer_and_kind",
    "OUTLIER_FACTOR",
]

#: A module whose ‖ΔW‖_F exceeds this many times the median of its module type is flagged.
OUTLIER_FACTOR = 10.0
_MIN_PEERS = 4
#: Singular values kept per module in the report (for plots and --json).
KEPT_VALUES = 64
_LAYER = re.compile(r"(?:^|[._])(\d+)(?=[._])")


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """(layer index, module type) of a module path: `model.layers.3.self_attn.q_proj` → (3, "self_attn.q_proj")."""
    match = _LAYER.search(name)
    if match is None:
        return None, name.rsplit(".", 1)[-1]
    rest = name[match.end() + 1 :]
    return int(match.group(1)), rest or name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModuleStats:
    """What one adapted module does to its layer."""

    name: str
    layer: int | None
    kind: str
    type: str
    variant: str
    rank: int
    scale: float
    frobenius: float
    top_singular_value: float
    stable_rank: float
    rank_90: int | None
    rank_99: int | None
    relative_to_base: float | None
    flags: list[str]
    singular_values: list[float]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StatsReport:
    """Statistics of every module, and what `resize --energy 0.99` would make of the adapter."""

    path: str
    base: str | None
    modules: list[ModuleStats]
    resize_energy: float
    resize_parameters: int
    lora_parameters: int
    flagged: dict[str, list[str]]
    executor: str = "local"  # where the modules were measured: "local" or "ray"
    nodes: int = 1  # machines that measured them

    @property
    def resize_saving(self) -> float:
        """Share of the LoRA factors' parameters that `resize --energy 0.99` would remove."""
        return 1 - self.resize_parameters / self.lora_parameters if self.lora_parameters else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "resize_saving": self.resize_saving}


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _base_weight(checkpoint, module: LoraModule) -> torch.Tensor | None:
    if checkpoint is None:
        return None
    found = Targets(with_tied_head(checkpoint.tensors, checkpoint.config)).find(module)
    name = f"{found}.weight" if found else None
    if name is None or name not in checkpoint.tensors:
        return None
    return checkpoint.read(name).to(torch.float64)


def _dense_delta(adapter: Adapter, module: LoraModule, weight: torch.Tensor | None) -> torch.Tensor:
    """ΔW of a module formed in fp64, laid out as the base weight (DoRA: the effective change)."""

    def factor(key: str) -> torch.Tensor:
        return adapter.read(key).to(torch.float64)

    if tuner_of_variant(module.variant) is not None:  # PEFT's other tuners (IA3, OFT: the effect on W)
        shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
        return tuner_change(module, factor, weight, shapes)
    if module.variant != "lora":
        shape = weight.shape if weight is not None else module_delta_shape(adapter, module)  # factor shapes by role
        delta = module.scale * variant_delta(module, factor, torch.Size(shape))
    else:
        left, right = low_rank_pair(module, factor(module.a_key), factor(module.b_key))
        delta = module.scale * (left @ right)
        if weight is not None:
            delta = delta.reshape(weight.shape)
    if module.dora and weight is not None:
        merged = weight + delta.reshape(weight.shape)
        magnitude = factor(module.magnitude_key)
        delta = merged * per_output(module, magnitude / dora_norm(module, merged), merged) - weight
    return delta


def _module_spectrum(adapter: Adapter, module: LoraModule, weight: torch.Tensor | None) -> tuple[Spectrum, list[str]]:
    notes = []
    if module.variant == "lora" and not (module.dora and weight is not None):
        left, right = low_rank_pair(module, adapter.read(module.a_key), adapter.read(module.b_key))
        if module.dora:
            notes.append("DoRA: statistics of s·B·A only; pass --base for the effective change")
        return low_rank_spectrum(left, right, module.scale), notes
    delta = _dense_delta(adapter, module, weight)
    return dense_spectrum(delta.reshape(delta.shape[0], -1)), notes


def module_stats(adapter: Adapter, module: LoraModule, checkpoint) -> ModuleStats:
    keys = [module.a_key, module.b_key, *(k for _, k in module.factors), module.magnitude_key]
    tensors = [adapter.read(k) for k in dict.fromkeys(k for k in keys if k and k in adapter.tensors)]
    layer, kind = layer_and_kind(module.name)
    flags = []
    if not _finite(tensors):
        nan = float("nan")
        return ModuleStats(
            module.name, layer, kind, module.kind, module.variant, module.rank, module.scale, nan, nan, nan, None,
            None, None, ["nonfinite"], [],
        )  # fmt: skip
    weight = _base_weight(checkpoint, module)
    spectrum, notes = _module_spectrum(adapter, module, weight)
    if spectrum.energy == 0:
        flags.append("zero")
    relative = None
    if weight is not None:
        norm = float(weight.norm())
        relative = spectrum.frobenius / norm if norm > 0 else math.inf
    return ModuleStats(
        name=module.name,
        layer=layer,
        kind=kind,
        type=module.kind,
        variant=module.variant,
        rank=module.rank,
        scale=module.scale,
        frobenius=spectrum.frobenius,
        top_singular_value=spectrum.top,
        stable_rank=spectrum.stable_rank,
        rank_90=spectrum.rank_for(0.90),
        rank_99=spectrum.rank_for(0.99),
        relative_to_base=relative,
        flags=flags,
        singular_values=list(spectrum.values[:KEPT_VALUES]),
        notes=notes,
    )


def flag_outliers(modules: list[ModuleStats]) -> None:
    """Flag modules whose norm is far above the median of their peers.

    Peers are the modules of the same type (`q_proj` …) when there are at least four, else those of
    the same layer kind (linear, conv, embedding); with fewer than four peers nothing is flagged.
    """
    groups: dict[tuple[str, str], list[float]] = {}
    for m in modules:
        if math.isfinite(m.frobenius):
            groups.setdefault(("kind", m.kind), []).append(m.frobenius)
            groups.setdefault(("type", m.type), []).append(m.frobenius)
    for m in modules:
        peers = groups.get(("kind", m.kind), [])
        if len(peers) < _MIN_PEERS:
            peers = groups.get(("type", m.type), [])
        if len(peers) < _MIN_PEERS or not math.isfinite(m.frobenius):
            continue
        median = statistics.median(peers)
        if median > 0 and m.frobenius > OUTLIER_FACTOR * median:
            m.flags.append("outlier")


def resize_parameters(adapter: Adapter, modules: list[ModuleStats]) -> tuple[int, int]:
    """(parameters after `resize --energy 0.99`, parameters now) over the plain LoRA modules."""
    after = now = 0
    for module, stats in zip(adapter.modules, modules, strict=True):
        if module.variant != "lora":
            continue
        width = (math.prod(module.a_shape) + math.prod(module.b_shape)) // module.rank
        kept = stats.rank_99 if stats.rank_99 is not None else module.rank
        now += module.rank * width
        after += max(1, kept) * width  # resize keeps at least rank 1, as `choose_rank` does
    return after, now
