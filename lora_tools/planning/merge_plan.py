"""Pure merge planning: which adapter tensors change which base tensors, and where outputs go.

Nothing here reads tensor data. Functions take names, shapes and dtypes (the
`TensorInfo`s of headers) and return plain data, so they are tested with
hand-written shapes and no torch work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..adapters.model import Adapter, LoraModule, Replacement
from ..adapters.peft_rules import target_module_matches
from ..adapters.tuners import transforms_weight
from ..errors import IncompatibleError, InvalidInputError, UnsupportedError
from ..io.safetensors_header import DTYPE_SIZES, TensorInfo
from ..layouts.relayout import Piece
from ..layouts.vocab import resized_base
from ..quant.float8_casts import mergeable_dtype
from .compatibility import compatibility_problems
from .orientation import oriented
from .shards import plan_shards
from .targets import TIED, Targets, head_name, resolve_tensor, tied_embedding, weight_tensor, with_tied_head

__all__ = ["OUTPUT_DTYPES", "Term", "TensorTask", "MergePlan", "plan_merge", "untargeted_warning"]

#: `--dtype` spellings → safetensors dtype names.
OUTPUT_DTYPES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}


@dataclass(frozen=True)
class Term:
    """Adapter `adapter` contributes weight·ΔW of `module` to a tensor (`bias` for lora_B.bias)."""

    adapter: int
    module: LoraModule
    weight: float
    bias: bool = False
    piece: Piece | None = None


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is produced from the base (`source`) and the adapters."""

    name: str
    source: str
    shape: tuple[int, ...]
    in_dtype: str
    out_dtype: str
    terms: tuple[Term, ...] = ()
    replacements: tuple[tuple[int, Replacement, float], ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.terms or self.replacements)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.out_dtype]

    @property
    def dora(self) -> Term | None:
        return next((t for t in self.terms if t.module.dora and not t.bias), None)


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor in order, the shards they go to, and what the config must say."""

    tasks: list[TensorTask]
    shards: list[list[int]]
    untie_embeddings: bool = False
    warnings: list[str] = field(default_factory=list)
    vocab_size: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


def plan_merge(
    base: Mapping[str, TensorInfo],
    config: dict | None,
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    output_dtype: str | None = None,
    max_shard_size: int = 5_000_000_000,
    unmerge: bool = False,
    allow_unmatched: bool = False,
) -> MergePlan:
    """Pair every adapter tensor with the base tensor it changes.

    Args:
        base: the base checkpoint's tensors, in storage order.
        config: the base's config.json, for weight tying.
        adapters, weights: the adapters and their weights wᵢ (W' = W + Σ wᵢ·ΔWᵢ).
        output_dtype: a safetensors dtype for every float tensor, or None to keep each.
        max_shard_size: bytes per output shard.
        unmerge: plan W = W' − Σ wᵢ·ΔWᵢ instead.
        allow_unmatched: leave out (with a warning) adapter modules that match nothing in the base.

    Raises:
        IncompatibleError: listing every adapter tensor that does not fit.
        UnsupportedError: a combination that cannot be computed faithfully.
    """
    if len(weights) != len(adapters):
        raise InvalidInputError(
            f"got {len(weights)} --weight values for {len(adapters)} adapters; give one per adapter"
        )
    base, vocab_size = resized_base(base, adapters, resolve_tensor)  # embeddings an adapter grows (new tokens)
    problems, lenient = [], 0
    for adapter in adapters:
        found = compatibility_problems(adapter, base, config, allow_unmatched=allow_unmatched)
        problems += [f"{adapter.path}: {p}" for p in found]
        if found and not allow_unmatched:
            lenient += len(compatibility_problems(adapter, base, config, allow_unmatched=True))
    if problems:
        hint = _unmatched_hint(len(problems), lenient) if not allow_unmatched else ""
        raise IncompatibleError(f"{len(problems)} problem(s) between adapter and base{hint}", problems)
    adapters = [oriented(adapter, base, config)[0] for adapter in adapters]  # checked above: no problems left
    targets = Targets(with_tied_head(base, config))

    sign = -1.0 if unmerge else 1.0
    terms: dict[str, list[Term]] = {}
    replaced: dict[str, list[tuple[int, Replacement, float]]] = {}
    warnings: list[str] = []
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        unmatched = 0
        for module in adapter.modules:
            located = targets.located(module)
            if located is not None and located.whole is None:  # row blocks of other weights (fused projections)
                for weight_name, bias_name, piece in located.parts:
                    if module.variant != "full" or module.factor("diff") is not None:
                        terms.setdefault(weight_name, []).append(Term(index, module, sign * weight, piece=piece))
                    if module.bias_key is not None:
                        terms.setdefault(bias_name, []).append(Term(index, module, sign * weight, True, piece))
                continue
            target = targets.find(module)
            if target is None:
                unmatched += 1
                continue
            if module.variant != "full" or module.factor("diff") is not None:  # `.diff_b` alone: the bias only
                terms.setdefault(weight_tensor(module, target), []).append(Term(index, module, sign * weight))
            if module.bias_key is not None:
                terms.setdefault(f"{target}.bias", []).append(Term(index, module, sign * weight, bias=True))
        for item in adapter.replacements:
            replaced.setdefault(resolve_tensor(item.target, targets.base), []).append((index, item, weight))
        if unmatched:
            warnings.append(
                f"{adapter.path}: {unmatched} of {len(adapter.modules)} modules match nothing in the base and were "
                "left out (--allow-unmatched)"
            )

    _check_combinations(adapters, terms, replaced, unmerge)
    warnings += [line for adapter in adapters for line in untargeted_warning(adapter)]

    tied, head = tied_embedding(base, config), head_name(config)
    untie = tied is not None and (head in terms or head in replaced or _changes_embedding(tied, terms, replaced))
    tasks: list[TensorTask] = []

    def add(name: str, source: str) -> None:
        info = base[source]
        castable = info.is_float or mergeable_dtype(info.dtype)
        out_dtype = output_dtype if output_dtype is not None and castable else info.dtype
        tasks.append(
            TensorTask(
                name,
                source,
                info.shape,
                info.dtype,
                out_dtype,
                tuple(terms.get(name, ())),
                tuple(replaced.get(name, ())),
            )
        )

    for name in base:
        add(name, name)
        if untie and name == tied:
            add(head, tied)
            warnings.append(
                f"the base ties lm_head to {tied} and an adapter changes one of them: "
                "both are written and tie_word_embeddings is set to false in config.json"
            )
    shards = plan_shards([task.nbytes for task in tasks], max_shard_size)
    return MergePlan(tasks, shards, untie, warnings, vocab_size)


def untargeted_warning(adapter: Adapter) -> list[str]:
    """A PEFT folder's LoRA modules that its `target_modules` list does not match: PEFT never loads them.

    PEFT builds LoRA layers only where `target_modules` matches (a name equal to the path or a dotted suffix) and
    drops the other factors on loading, with a warning; lora_tools merges what the file holds, and says so.
    """
    targets = adapter.config.get("target_modules")
    if adapter.format != "peft" or not isinstance(targets, list) or adapter.config.get("layers_to_transform"):
        return []
    missed = [
        m.name
        for m in adapter.modules
        if m.variant == "lora"
        and m.a_key.startswith(f"base_model.model.{m.name}.lora_")  # as saved, not renamed to the checkpoint's names
        and not target_module_matches(targets, m.name)
        and not _names_parameter(adapter.config.get("target_parameters") or [], m.name)
    ]
    if not missed:
        return []
    return [
        f"{adapter.path}: {len(missed)} module(s) ({missed[0]}{', …' if len(missed) > 1 else ''}) are not in "
        "adapter_config.json's target_modules: PEFT does not load them (its merge leaves those weights unchanged); "
        "lora_tools merged them as the file holds them"
    ]


def _names_parameter(target_parameters: list, module: str) -> bool:
    """True when a `target_parameters` entry (`gate.weight`, `mlp.experts.down_proj`) names a parameter of `module`."""
    for entry in target_parameters:
        owner = str(entry).rpartition(".")[0]
        if any(module == name or module.endswith(f".{name}") for name in (entry, owner) if name):
            return True
    return False


def _unmatched_hint(problems: int, remaining: int) -> str:
    """Suggest --allow-unmatched only when it would leave out some problems: all of them, or some (saying so)."""
    unmatched = problems - remaining
    if unmatched == 0:
        return ""
    if remaining == 0:
        return f" ({unmatched} module(s) match nothing in the base; --allow-unmatched merges the rest)"
    return (
        f" ({unmatched} module(s) match nothing, which --allow-unmatched would leave out; the other {remaining} remain)"
    )


def _changes_embedding(tied: str, terms: dict, replaced: dict) -> bool:
    """True when the tied embedding changes in a way lm_head must not follow (trainable tokens it follows)."""
    if tied in terms:
        return True
    return any(item.rows is None and not item.origin.endswith(TIED) for _, item, _ in replaced.get(tied, ()))


def _check_combinations(adapters: Sequence[Adapter], terms: dict, replaced: dict, unmerge: bool) -> None:
    problems: list[str] = []
    for name, items in terms.items():
        dora = [t for t in items if t.module.dora and not t.bias]
        if dora and (len(items) > 1 or abs(dora[0].weight) != 1.0):
            problems.append(f"{name}: a DoRA module merges alone with weight 1 (DoRA is not additive)")
        transformed = [t for t in items if transforms_weight(t.module)]
        if transformed and (len(items) > 1 or abs(transformed[0].weight) != 1.0):
            variant = transformed[0].module.variant
            problems.append(f"{name}: a {variant} module transforms W, so it merges alone with weight 1")
    for name, items in replaced.items():
        whole = [i for i in items if i[1].rows is None and i[1].origin != "saved base layer"]
        if len(whole) > 1:
            problems.append(f"{name}: replaced by {len(whole)} adapters' modules_to_save; merge them separately")
        if unmerge and any(i[1].origin != "saved base layer" for i in items):
            origin = items[0][1].origin
            problems.append(
                f"{name}: {adapters[items[0][0]].path} replaced it ({origin}); the original values are not in the "
                "merged model, so it cannot be un-merged"
            )
    if problems:
        raise UnsupportedError("; ".join(problems))
