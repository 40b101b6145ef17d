"""`combine`: several adapters into one adapter — exact concatenation, best rank-k, TIES / DARE / pruning.

Every method combines, per module, the scaled updates ΔWᵢ = sᵢ·Bᵢ·Aᵢ of the adapters
that have the module, with weights wᵢ:

- `cat` — exact: A stacked over B concatenated, with wᵢ·sᵢ folded into Aᵢ, rank Σ rᵢ;
  alpha = rank so the output scale is 1 (PEFT's `cat`).
- `svd` — the best rank-k approximation of Σ wᵢ·ΔWᵢ (Eckart–Young). When Σ rᵢ is small
  against the matrix it is computed without forming ΔW: QR of the stacked B and of the
  stacked Aᵀ, SVD of the small Σrᵢ × Σrᵢ core (the `resize` route); otherwise densely
  (PEFT's `svd`).
- `ties` — trim each ΔWᵢ to its largest-magnitude fraction `density`, elect a sign per
  element (sum of values, or count of signs), average the weighted values that agree
  (PEFT's `ties_svd`).
- `dare-linear` — drop each element of ΔWᵢ with probability 1 − density, rescale by
  1/density, weighted sum (PEFT's `dare_linear_svd`); unbiased: E = Σ wᵢ·ΔWᵢ.
- `dare-ties` — DARE's drop and rescale, then TIES' sign election and disjoint mean
  (PEFT's `dare_ties_svd`).
- `magnitude-prune` — trim each ΔWᵢ by magnitude to `density`, weighted sum (PEFT's
  `magnitude_prune_svd`).

The last four act on the full ΔWᵢ, as PEFT's `*_svd` variants do (PEFT's variants without
`_svd` prune the factors A and B separately, which is not the published method), and are
then re-factorised by truncated SVD to the rank rule. DARE draws its masks from a
generator seeded by (seed, module name), one adapter after another, so a run is
reproducible byte for byte and independent of module order. LoHa / LoKr / Tucker inputs
are formed into ΔW first. Modules are handled one at a time, factors spooled to disk,
the output appears atomically.
"""

from __future__ import annotations

import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import CallableModule
from .adapters.reading import Adapter, LoraModule, read_adapter
from .errors import IncompatibleError, InvalidInputError, UnsupportedError
from .extraction import Spool, factorize, mean_relative_error, peft_adapter_config, write_adapter_config
from .io.card import display_name, write_card
from .io.hub import resolve_input
from .io.output import atomic_output, checksums
from .rank import RankRule, choose_rank

if TYPE_CHECKING:
    import torch

__all__ = [
    "combine",
    "combine_deltas",
    "plan_combination",
    "CombineOptions",
    "CombineReport",
    "ModuleCombination",
    "METHODS",
    "PEFT_EQUIVALENT",
]

METHODS = ("cat", "svd", "ties", "dare-linear", "dare-ties", "magnitude-prune")
#: The `combination_type` of PEFT's `add_weighted_adapter` each method reproduces.
PEFT_EQUIVALENT = {
    "cat": "cat",
    "svd": "svd",
    "ties": "ties_svd",
    "dare-linear": "dare_linear_svd",
    "dare-ties": "dare_ties_svd",
    "magnitude-prune": "magnitude_prune_svd",
}
SIGN_METHODS = ("total", "frequency")
TARGET_FORMATS = ("peft", "kohya")
_PRUNING = ("ties", "dare-linear", "dare-ties", "magnitude-prune")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CombineOptions:
    """How to combine: the method, its rank rule, density, sign rule, seed.

    Without a rule each module gets its largest input rank (as PEFT does), capped by `max_rank`.
    """

    method: str = "cat"
    rule: RankRule | None = None
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_rank is not None and self.max_rank <= 0:
            raise InvalidInputError(f"--max-rank must be a positive integer, got {self.max_rank}")
        if self.method == "cat" and (self.rule is not None or self.max_rank is not None):
            raise InvalidInputError(
                "--method cat keeps every rank (Σ rᵢ); --rank / --energy / --sv-ratio / --max-rank "
                "need --method svd, ties, dare-linear, dare-ties or magnitude-prune"
            )
        if self.method in _PRUNING:
            if self.density is None:
                raise InvalidInputError(f"--method {self.method} needs --density D, the fraction kept, in (0, 1]")
            if not 0 < self.density <= 1:
                raise InvalidInputError(f"--density must be in (0, 1], got {self.density:g}")
        elif self.density is not None:
            raise InvalidInputError(f"--density applies to {', '.join(_PRUNING)}, not to --method {self.method}")
        if self.majority_sign not in SIGN_METHODS:
            raise InvalidInputError(f"--majority-sign must be total or frequency, got {self.majority_sign!r}")

    def rule_for(self, default_rank: int) -> RankRule:
        return self.rule or RankRule(rank=default_rank, max_rank=self.max_rank)


@dataclass(frozen=True)
class ModuleCombination:
    """One output module: which adapters fed it, rank in (Σ rᵢ) and out, and how far it is from exact.

    `relative_error` is ‖Σ wᵢ·ΔWᵢ − B·A‖ / ‖Σ wᵢ·ΔWᵢ‖ (for TIES / DARE / pruning it includes what the
    method itself changes); `truncation_error` is the same against the method's own combined ΔW,
    i.e. what the re-factorisation to `rank_out` lost.
    """

    name: str
    shape: tuple[int, ...]
    adapters: list[int]  # 1-based positions on the command line
    rank_in: int
    rank_out: int
    relative_error: float
    truncation_error: float
    route: str


@dataclass(frozen=True)
class CombineReport:
    operation: str
    output: str
    method: str
    format: str
    device: str
    inputs: list[dict]
    modules: list[ModuleCombination]
    partial: list[dict]
    parameters: int
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    checksums: dict[str, str] | None = None

    @property
    def mean_relative_error(self) -> float:
        return mean_relative_error(self.modules)

    @property
    def max_relative_error(self) -> float:
        return max((m.relative_error for m in self.modules), default=0.0)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "mean_relative_error": self.mean_relative_error,
            "max_relative_error": self.max_relative_error,
        }


# --- planning (pure: names and shapes) -------------------------------------------------------


@dataclass(frozen=True)
class _Member:
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
    members: tuple[_Member, ...]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])


def _delta_shape(adapter: Adapter, module: LoraModule) -> tuple[int, ...]:
    """ΔW's shape in factor layout (B's rows first), from the factor shapes alone."""
    if module.variant == "lora":
        return (module.b_shape[0], *module.a_shape[1:])
    from .convert import _delta_shape as variant_shape

    return tuple(variant_shape(adapter, module))


def plan_combination(adapters: Sequence[Adapter], names: Sequence[Callable[[LoraModule], str]]) -> list[ModuleGroup]:
    """Group the adapters' modules by output module and check they agree (headers only).

    Args:
        names: per adapter, the output module path of each of its modules.

    Raises:
        IncompatibleError: a module's ΔW shape, layer kind or layout differs between adapters
            (adapters for different bases), every mismatch listed.
    """
    grouped: dict[tuple[str | None, str], list[_Member]] = {}
    for index, (adapter, name_of) in enumerate(zip(adapters, names, strict=True)):
        for module in adapter.modules:
            member = _Member(index, module, _delta_shape(adapter, module))
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


# --- the methods (pure tensor functions) -----------------------------------------------------


def _magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest-magnitude elements (PEFT's `magnitude_based_pruning`)."""
    import torch

    if density >= 1:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def _random_prune(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: drop each element with probability 1 − density, rescale the rest by 1/density."""
    import torch

    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full(delta.shape, density, dtype=delta.dtype), generator=generator)
    return delta * mask.to(delta.device) / density


def _disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES: elect a sign per element, average the weighted values that carry it."""
    import torch

    signs = stacked.sign()
    votes = stacked.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    kept = (stacked * weights * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1).to(stacked.dtype)


def combine_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str,
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The combined ΔW of one module from the full ΔWᵢ, as PEFT's merge utilities define it.

    `cat` and `svd` give Σ wᵢ·ΔWᵢ; see the module docstring for the others. DARE's masks are
    drawn from `generator` in adapter order (the global generator when None).
    """
    import torch

    stack_weights = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)
    stack_weights = stack_weights.reshape(-1, *([1] * deltas[0].dim()))
    if method in ("cat", "svd"):
        return (torch.stack(list(deltas)) * stack_weights).sum(dim=0)
    if method in ("ties", "magnitude-prune"):
        pruned = [_magnitude_prune(delta, density) for delta in deltas]
    elif method in ("dare-linear", "dare-ties"):
        pruned = [_random_prune(delta, density, generator) for delta in deltas]
    else:
        raise InvalidInputError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    stacked = torch.stack(pruned)
    if method in ("ties", "dare-ties"):
        return _disjoint_mean(stacked, stack_weights, majority_sign)
    return (stacked * stack_weights).sum(dim=0)


# --- per-module computation ------------------------------------------------------------------


def _low_rank_norm(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖left·right‖_F without forming the product: √Σ (LᵀL) ⊙ (RRᵀ), in fp64."""
    left, right = left.double(), right.double()
    return math.sqrt(max(0.0, float(((left.T @ left) * (right @ right.T)).sum())))


def _numerical_factors(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors of `matrix` at its numerical rank (σ > σ₀·ε·max(m, n)): exact to rounding."""
    import torch

    left, values, vh = torch.linalg.svd(matrix, full_matrices=False)
    tolerance = float(values[0]) * torch.finfo(matrix.dtype).eps * max(matrix.shape) if values.numel() else 0.0
    rank = max(1, int((values > tolerance).sum()))
    root = values[:rank].sqrt()
    return left[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass
class _Result:
    up: torch.Tensor  # m×k
    down: torch.Tensor  # k×n
    relative_error: float
    truncation_error: float
    route: str


class _Reader:
    """Reads the members of a group as (left, right) factor pairs or dense ΔW, scale applied."""

    def __init__(self, adapters: Sequence[Adapter], device: torch.device, compute: torch.dtype) -> None:
        self.adapters, self.device, self.compute = adapters, device, compute

    def read(self, member: _Member, key: str) -> torch.Tensor:
        return self.adapters[member.adapter].read(key).to(self.device, self.compute)

    def pair(self, member: _Member, rows: int, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, factor·s·A) as m×r, r×n fp64 matrices (the product folded in fp64, rounded never)."""
        import torch

        module = member.module
        adapter = self.adapters[member.adapter]
        up = adapter.read(module.b_key).to(self.device, torch.float64).reshape(rows, -1)
        down = adapter.read(module.a_key).to(self.device, torch.float64).reshape(up.shape[1], -1)
        return up, down * (module.scale * factor)

    def dense(self, member: _Member, group: ModuleGroup) -> torch.Tensor:
        """s·ΔW as an m×n matrix: B·A (as PEFT's get_delta_weight computes it) or the variant's product."""
        import torch

        from .ops import variant_delta

        module = member.module
        rows, cols = group.matrix_shape
        if module.variant == "lora":
            up = self.read(member, module.b_key).reshape(rows, -1)
            return (up @ self.read(member, module.a_key).reshape(up.shape[1], cols)) * module.scale
        delta = variant_delta(module, lambda key: self.read(member, key), torch.Size(member.shape))
        return delta.reshape(rows, cols) * module.scale


def _cat(group: ModuleGroup, weights: Sequence[float], reader: _Reader) -> _Result:
    import torch

    rows, _ = group.matrix_shape
    ups, downs = [], []
    for member in group.members:
        if member.module.variant == "lora":
            up, down = reader.pair(member, rows, weights[member.adapter])
        else:
            up, down = _numerical_factors(reader.dense(member, group).double() * weights[member.adapter])
        ups.append(up)
        downs.append(down)
    up, down = torch.cat(ups, dim=1).to(reader.compute), torch.cat(downs, dim=0).to(reader.compute)
    error = _relative_residual(ups, downs, up, down)
    route = "stacked" if all(m.module.variant == "lora" for m in group.members) else "stacked (variants by SVD)"
    return _Result(up, down, error, error, route)


def _relative_residual(ups, downs, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖Σ upsᵢ·downsᵢ − up·down‖ / ‖Σ upsᵢ·downsᵢ‖ through the Gram trick (no m×n product)."""
    import torch

    exact_left, exact_right = torch.cat(list(ups), dim=1), torch.cat(list(downs), dim=0)
    norm = _low_rank_norm(exact_left, exact_right)
    left = torch.cat([exact_left.double(), -up.double()], dim=1)
    right = torch.cat([exact_right.double(), down.double()], dim=0)
    return _low_rank_norm(left, right) / norm if norm else 0.0


def _svd_stacked(group: ModuleGroup, weights: Sequence[float], reader: _Reader, rule: RankRule) -> _Result:
    """Best rank-k of Σ wᵢ·sᵢ·BᵢAᵢ via QR of the stacked factors and the SVD of the small core."""
    import torch

    rows, cols = group.matrix_shape
    ups, downs = [], []
    for member in group.members:
        up, down = reader.pair(member, rows, weights[member.adapter])
        ups.append(up)
        downs.append(down)
    q_up, r_up = torch.linalg.qr(torch.cat(ups, dim=1))
    q_down, r_down = torch.linalg.qr(torch.cat(downs, dim=0).T)
    core_u, values, core_vh = torch.linalg.svd(r_up @ r_down.T)
    rank = max(1, choose_rank(values.tolist(), float(values.pow(2).sum()), rule, min(rows, cols)))
    root = values[:rank].sqrt()
    up = ((q_up @ core_u[:, :rank]) * root).to(reader.compute)
    down = (root[:, None] * (core_vh[:rank] @ q_down.T)).to(reader.compute)
    error = _relative_residual(ups, downs, up, down)
    return _Result(up, down, error, error, "qr-svd")


def _dense(
    group: ModuleGroup, weights: Sequence[float], reader: _Reader, options: CombineOptions, default_rank: int
) -> _Result:
    """Form each ΔWᵢ, combine by the method, re-factorise to the rule; errors measured densely."""
    import torch

    deltas = [reader.dense(member, group) for member in group.members]
    member_weights = [weights[m.adapter] for m in group.members]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{options.seed}:{group.name}".encode()))
    combined = combine_deltas(
        deltas, member_weights, options.method, density=options.density or 1.0,
        majority_sign=options.majority_sign, generator=generator,
    )  # fmt: skip
    exact = sum(delta.double() * weight for delta, weight in zip(deltas, member_weights, strict=True))
    del deltas
    up, down, method = factorize(combined, options.rule_for(default_rank), "auto", seed=zlib.crc32(group.name.encode()))
    if up.shape[1] == 0:  # ΔW is exactly zero: one zero component keeps the module loadable
        up, down = up.new_zeros(up.shape[0], 1), down.new_zeros(1, down.shape[1])
    up, down = up.to(reader.compute), down.to(reader.compute)
    product = up.double() @ down.double()
    exact_norm, combined_norm = float(exact.norm()), float(combined.double().norm())
    error = float((exact - product).norm()) / exact_norm if exact_norm else 0.0
    truncation = float((combined.double() - product).norm()) / combined_norm if combined_norm else 0.0
    return _Result(up, down, error, truncation, f"dense ({method})")


def _combine_group(group: ModuleGroup, weights: Sequence[float], reader: _Reader, options: CombineOptions) -> _Result:
    rows, cols = group.matrix_shape
    rank_in = sum(m.module.rank for m in group.members)
    default_rank = max(m.module.rank for m in group.members)
    low_rank = all(m.module.variant == "lora" for m in group.members)
    if options.method == "cat":
        return _cat(group, weights, reader)
    if options.method == "svd" and low_rank and rank_in * 2 <= min(rows, cols):
        return _svd_stacked(group, weights, reader, options.rule_for(default_rank))
    return _dense(group, weights, reader, options, default_rank)


# --- inputs ----------------------------------------------------------------------------------


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
    from .io.checkpoint import open_checkpoint
    from .plan import Targets

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
    from dataclasses import replace

    if component is None:
        return adapter
    modules = [replace(m, component=component) for m in adapter.modules if m.component in (None, component)]
    return replace(adapter, modules=modules)


def _load_inputs(
    specs: Sequence[str | os.PathLike], *, alpha, base, component, to, revision, token
) -> tuple[list[Adapter], list[str], Path | None]:
    loaded, shown = [], []
    for spec in specs:
        local, repo = resolve_input(spec, revision=revision, token=token)
        adapter = _restrict(read_adapter(local, alpha=alpha), component)
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


def _write_module(spool: Spool, group: ModuleGroup, result: _Result, to: str) -> int:
    """Spool one module's factors in the target format's keys and shapes; return its rank."""
    import torch

    rank = result.up.shape[1]
    up = result.up.reshape(group.shape[0], rank, *([1] * (len(group.shape) - 2)))
    down = result.down.reshape(rank, *group.shape[1:])
    if to == "kohya":
        from .convert import _KOHYA_PREFIX_FOR

        prefix = _KOHYA_PREFIX_FOR.get(group.component or "")
        if prefix is None:
            raise InvalidInputError(f"{group.name}: pass --component (unet, text_encoder, …) to name kohya modules")
        name = f"{prefix}_{group.name.replace('.', '_')}"
        spool.add(f"{name}.lora_down.weight", down.contiguous())
        spool.add(f"{name}.lora_up.weight", up.contiguous())
        spool.add(f"{name}.alpha", torch.tensor(float(rank)))
        return rank
    prefix = f"base_model.model.{group.name}"
    keys = ("lora_embedding_A", "lora_embedding_B") if group.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
    spool.add(f"{prefix}.{keys[0]}", down.contiguous())
    spool.add(f"{prefix}.{keys[1]}", up.contiguous())
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
    from .extraction import _rule_words

    words = ["loratool", "combine", *shown, "--output", "OUTPUT", "--method", options.method]
    for weight in weights:
        words += ["--weight", f"{weight:g}"]
    words += _rule_words(options.rule) if options.rule is not None else []
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

    Returns:
        A `CombineReport`: per module the adapters that fed it, rank in and out, relative errors.

    Raises:
        InvalidInputError: bad options, weights count ≠ adapters count, unreadable inputs.
        IncompatibleError: the adapters' modules differ in shape (different bases).
        UnsupportedError: DoRA, lora_B.bias, modules_to_save, or a module with no spelling in `to`.
    """
    import torch

    from .device import resolve_device

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
    reader = _Reader(loaded, torch_device, compute)
    modules: list[ModuleCombination] = []
    ranks: dict[str, int] = {}
    inputs = [a.path for a in loaded] + ([base_local] if base_local is not None else [])
    with atomic_output(output, is_dir=to == "peft", force=force, inputs=inputs) as target:
        scratch = target / ".factors.spool" if to == "peft" else target.parent / f".{target.name}.spool"
        spool = Spool(scratch)
        try:
            for number, group in enumerate(groups, 1):
                result = _combine_group(group, factor_weights, reader, options)
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
    return _report(output, to, torch_device, loaded, shown, factor_weights, options, modules, size, started, digests)


def _finish(spool, target: Path, to, loaded, shown, weights, options, modules, ranks) -> int:
    base_model = next((a.base_model for a in loaded if a.base_model), None)
    if to == "kohya":
        dims = sorted(set(ranks.values()))
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(dims[0]) if len(dims) == 1 else "dynamic",
                    "loratool_combine": f"{options.method} of {len(loaded)} adapters"}  # fmt: skip
        if base_model:
            metadata["ss_sd_model_name"] = base_model
        return spool.finish(target, metadata=metadata)
    size = spool.finish(target / "adapter_model.safetensors")
    fan_in_fan_out = any(m.fan_in_fan_out for a in loaded for m in a.modules)
    config = peft_adapter_config(
        ranks, {m: float(r) for m, r in ranks.items()}, base_model=base_model, fan_in_fan_out=fan_in_fan_out,
        modules_to_save=[],
    )  # fmt: skip
    write_adapter_config(target, config)
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


sys.modules[__name__].__class__ = CallableModule  # `lora_tools.combine(...)` even once this module is imported
