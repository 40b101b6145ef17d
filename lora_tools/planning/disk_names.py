"""Rewrite an adapter saved with a model's in-memory names into its checkpoint's on-disk names and tensors.

Runs between reading an adapter and planning a merge: modules that already
match the base keep their names; others go through the user's `--rename`
rules and the model type's layout (`layouts.transformers`). PEFT
`target_parameters` modules on fused experts become one plain LoRA per
on-disk expert tensor, whose A and B are *views* (slices) of the stored
factors, so the planner and the arithmetic need to know nothing about experts;
experts that stay fused on disk (gpt-oss) become one `experts` module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..adapters.model import Adapter, LoraModule, Replacement
from ..adapters.peft import pattern_key
from ..errors import IncompatibleError
from ..io.safetensors_header import TensorInfo
from ..layouts.experts import ExpertReading, expert_rows_of_a, read_expert_shapes, split_pieces
from ..layouts.transformers import LAYOUTS, FusedExperts, Rename, layout_for, to_disk_path
from .expert_linears import ExpertLinears, Stacked
from .targets import TIED, Targets, head_name, tied_embedding, with_tied_head

__all__ = ["DiskNames", "to_disk_names", "adapters_on_disk", "SlicedWeights", "plan_in_memory_names"]

_GENERIC_EXPERTS = (FusedExperts("gate_up_proj", ("gate_proj", "up_proj")), FusedExperts("down_proj", ("down_proj",)))


@dataclass(frozen=True)
class _View:
    """A virtual adapter tensor: `source[rows][:, cols]`, transposed when asked."""

    source: str
    rows: tuple[int, int | None, int] = (0, None, 1)
    cols: tuple[int, int | None, int] = (0, None, 1)
    transpose: bool = False

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, int]:
        rows = len(range(*slice(*self.rows).indices(source_shape[0])))
        cols = len(range(*slice(*self.cols).indices(source_shape[1])))
        return (cols, rows) if self.transpose else (rows, cols)


class SlicedWeights:
    """An adapter's stored tensors plus virtual slices of them, readable alike (a `Checkpoint` stand-in)."""

    def __init__(self, weights, views: Mapping[str, _View]) -> None:
        self._weights = weights
        self._views = dict(views)
        self._cache: dict = {}
        stored = weights.tensors
        self.tensors: dict[str, TensorInfo] = dict(stored)
        for key, view in self._views.items():
            if isinstance(view, Stacked):
                self.tensors[key] = replace(stored[view.blocks[0].source], name=key, shape=view.shape, offset=None)
                continue
            source = stored[view.source]
            self.tensors[key] = replace(source, name=key, shape=view.shape(source.shape), offset=None)

    def read(self, key: str):
        view = self._views.get(key)
        if view is None:
            return self._weights.read(key)
        if isinstance(view, Stacked):
            return view.build(self._weights.read)
        tensor = self._source(view.source)[slice(*view.rows), slice(*view.cols)]
        return (tensor.T if view.transpose else tensor).contiguous()

    def _source(self, key: str):
        """A stored factor, kept while its experts are read (a few at a time: A and B of gate_up and down)."""
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._weights.read(key)
        return self._cache[key]

    def __getattr__(self, name: str):
        return getattr(self._weights, name)


@dataclass(frozen=True)
class DiskNames:
    """The adapter in on-disk names; per original module, the rule that mapped it and where it went (`inspect`)."""

    adapter: Adapter
    rules: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)
    per_expert: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # module → rank, alpha, scale


def _strip_nesting(name: str) -> str:
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def _wrapped_modules(config: dict) -> list[str]:
    """Module paths (or bare names) whose parameters `target_parameters` adapts, other than plain weights."""
    found = []
    for entry in config.get("target_parameters") or []:
        module, _, param = str(entry).rpartition(".")
        if param != "weight":
            found.append(module)
    return found


def _is_expert_module(module: LoraModule, nested: bool, memory: str, config: dict) -> bool:
    """A PEFT ParamWrapper on fused experts (never left out silently, even under --allow-unmatched)."""
    if module.kind != "linear" or module.variant != "lora":
        return False
    if nested or memory.rsplit(".", 1)[-1] == "experts":
        return True
    wrapped = _wrapped_modules(config)
    return any(m and (memory == m or memory.endswith(f".{m}")) for m in wrapped)


def _expert_shape(spec: FusedExperts, prefix: str, base: Mapping[str, TensorInfo]) -> tuple[int, int, int] | None:
    """The in-memory shape [E, d1, d2] of `{prefix}.{spec.param}`, from the checkpoint's tensors."""
    if not spec.parts:
        info = base.get(f"{prefix}.{spec.param}")
        return tuple(info.shape) if info is not None and len(info.shape) == 3 else None
    experts = 0
    while f"{prefix}.{experts}.{spec.parts[0]}.weight" in base:
        experts += 1
    if not experts:
        return None
    shapes = [base.get(f"{prefix}.0.{part}.weight") for part in spec.parts]
    if any(s is None or len(s.shape) != 2 or s.shape[1] != shapes[0].shape[1] for s in shapes):
        return None
    return experts, sum(s.shape[0] for s in shapes), shapes[0].shape[1]


class _Rewriter:
    def __init__(self, adapter: Adapter, base: Mapping[str, TensorInfo], config: dict | None, user: Sequence[Rename]):
        self.adapter, self.base, self.user = adapter, base, tuple(user)
        self.model_type, self.layout = layout_for(config)
        self.targets = Targets(with_tied_head(base, config))
        self.label = self.model_type
        if self.model_type not in LAYOUTS and any(self._unmatched(module) for module in adapter.modules):
            from ..layouts.hf_rules import transformers_layout  # imports transformers: only when names disagree

            found = transformers_layout(self.model_type)
            if found is not None:
                self.layout, self.label = found.layout, found.source
        self.views: dict[str, _View] = {}
        self.rules: dict[str, str] = {}
        self.mapped: dict[str, str] = {}
        self.per_expert: dict[str, tuple[int, float, float]] = {}
        self.problems: list[str] = []
        self.linears = ExpertLinears(base, self.layout, self.model_type)

    def _unmatched(self, module: LoraModule) -> bool:
        return self.targets.find(replace(module, name=to_disk_path(module.name, self.user)[0])) is None

    def rename(self, name: str, module: LoraModule | None = None) -> tuple[str, list[str]]:
        """User renames, then the layout's when the name does not already match the base."""
        name, fired = to_disk_path(name, self.user)
        notes = [f"--rename {rule}" for rule in fired]
        found = module is None or self.targets.find(replace(module, name=name)) is not None
        if module is not None and found:
            return name, notes
        renamed, fired = to_disk_path(name, self.layout.renames)
        if fired and (module is None or self.targets.find(replace(module, name=renamed)) is not None):
            return renamed, notes + [f"{self.label}: {rule}" for rule in fired]
        return name, notes

    def module(self, module: LoraModule) -> list[LoraModule]:
        renamed = to_disk_path(module.name, self.user)[0]
        memory = _strip_nesting(renamed)
        if _is_expert_module(module, renamed != memory, memory, self.adapter.config):
            return self.experts(module, memory)
        if self.targets.find(replace(module, name=renamed)) is None and self.linears.claim(module, renamed):
            return []  # a per-expert Linear into fused-on-disk experts: stacked once all are seen
        name, notes = self.rename(module.name, module)
        if notes:
            self.rules[module.name] = "; ".join(notes)
        self.mapped[module.name] = name
        return [replace(module, name=name)]

    def experts(self, module: LoraModule, memory: str) -> list[LoraModule]:
        prefix, fired = to_disk_path(memory, self.layout.renames)
        specs = self.layout.experts or _GENERIC_EXPERTS
        found, errors = [], []
        for spec in specs:
            shape = _expert_shape(spec, prefix, self.base)
            if shape is None:
                continue
            try:
                reading = read_expert_shapes(
                    module.name, shape, module.a_shape, module.b_shape, in_first=spec.in_first,
                    peft_version=self.adapter.config.get("peft_version"),
                )  # fmt: skip
            except IncompatibleError as exc:
                errors.append(str(exc))
                continue
            found.append((spec, shape, reading))
        if len(found) != 1:
            no_experts = (
                f"targets fused experts (PEFT target_parameters) but the base has no experts at {prefix} (model type "
                f"{self.model_type or 'unknown'}); --allow-unmatched cannot leave out a delta lora_tools recognises"
            )
            what = "fits several expert parameters" if found else "; ".join(errors) or no_experts
            self.problems.append(f"{module.name}: {what}")
            return []
        spec, shape, reading = found[0]
        alpha = self._alpha(f"{memory}.{spec.param}")
        scale = alpha / math.sqrt(reading.rank) if self.adapter.use_rslora else alpha / reading.rank
        rule = f"{self.label}: experts.{spec.param} {list(shape)}" + (
            f" → {'/'.join(spec.parts)} per expert" if spec.parts else " (fused on disk)"
        )
        self.rules[module.name] = rule + (" (swapped-orientation PEFT release)" if reading.old_peft else "")
        common = dict(kind="linear", rank=reading.rank, alpha=alpha, scale=scale)
        self.per_expert[module.name] = (reading.rank, alpha, scale)
        parts = "{" + ",".join(spec.parts) + "}" if len(spec.parts) > 1 else "".join(spec.parts)
        self.mapped[module.name] = (
            f"{prefix}.{spec.param}" if not spec.parts else f"{prefix}.{{0..{shape[0] - 1}}}.{parts}"
        )
        if not spec.parts:
            return [
                replace(
                    module, name=f"{prefix}.{spec.param}", variant="experts", fan_in_fan_out=reading.transposed,
                    factors=(("A", module.a_key), ("B", module.b_key)), **common,
                )
            ]  # fmt: skip
        return [self._piece(module, piece, reading, common) for piece in split_pieces(prefix, *shape[:2], spec.parts)]

    def _alpha(self, name: str) -> float:
        config = self.adapter.config
        patterns = config.get("alpha_pattern") or {}
        key = pattern_key(patterns, name)
        return float(patterns[key] if key is not None else config.get("lora_alpha", 8))

    def _piece(self, module: LoraModule, piece, reading: ExpertReading, common: dict) -> LoraModule:
        e, experts = piece.expert, reading.experts
        a_rows = (*expert_rows_of_a(e, reading.rank), 1)
        b_cols = (e, None, experts)
        out = (piece.out_start, piece.out_stop, 1)
        if not reading.transposed:  # ΔW_e = B_e·A_e, rows of B select the part
            a_view, b_view = _View(module.a_key, rows=a_rows), _View(module.b_key, rows=out, cols=b_cols)
        else:  # ΔW_e = (B_e·A_e)ᵀ: rows of it are columns of A_e
            a_view = _View(module.b_key, cols=b_cols, transpose=True)
            b_view = _View(module.a_key, rows=a_rows, cols=out, transpose=True)
        a_key, b_key = f"{module.a_key}@{piece.target}", f"{module.b_key}@{piece.target}"
        self.views[a_key], self.views[b_key] = a_view, b_view
        tensors = self.adapter.tensors
        return replace(
            module, name=piece.target, a_key=a_key, b_key=b_key,
            a_shape=a_view.shape(tensors[a_view.source].shape), b_shape=b_view.shape(tensors[b_view.source].shape),
            **common,
        )  # fmt: skip

    def replacement(self, item: Replacement) -> Replacement:
        module, _, leaf = item.target.rpartition(".")
        if item.target in self.base or not module:
            return item
        name, notes = self.rename(module)
        if f"{name}.{leaf}" in self.targets.base:  # a tied lm_head the checkpoint omits counts
            self.rules[item.key] = "; ".join(notes)
            return replace(item, target=f"{name}.{leaf}")
        return item


def to_disk_names(
    adapter: Adapter, base: Mapping[str, TensorInfo], config: dict | None, renames: Sequence[Rename] = ()
) -> DiskNames:
    """`adapter` with every module and replacement named as the base checkpoint names it on disk.

    Args:
        adapter: as read (in-memory names, as PEFT saves them).
        base: the checkpoint's tensors; config: its config.json (`model_type` picks the layout).
        renames: the user's `--rename` rules, applied to module paths first.

    Raises:
        IncompatibleError: expert modules that cannot be placed (never left out, even with
            --allow-unmatched), naming each module and why.
    """
    if not adapter.modules and not adapter.replacements:
        return DiskNames(adapter)
    rewriter = _Rewriter(adapter, base, config, renames)
    modules = [new for module in adapter.modules for new in rewriter.module(module)]
    linears = rewriter.linears
    modules += linears.modules()
    rewriter.views.update(linears.views)
    rewriter.rules.update(linears.rules)
    rewriter.mapped.update(linears.mapped)
    rewriter.problems += linears.problems
    if rewriter.problems:
        raise IncompatibleError(f"{adapter.path}: {len(rewriter.problems)} expert module(s) do not fit the base",
                                rewriter.problems)  # fmt: skip
    replacements = _keep_tie(adapter, [rewriter.replacement(item) for item in adapter.replacements], base, config)
    weights = SlicedWeights(adapter.weights, rewriter.views) if rewriter.views else adapter.weights
    rewritten = replace(adapter, modules=modules, replacements=replacements, weights=weights)
    return DiskNames(rewritten, rewriter.rules, rewriter.mapped, rewriter.per_expert)


def adapters_on_disk(adapters: Sequence[Adapter], base, renames: Sequence[str] = ()) -> list[Adapter]:
    """Every adapter rewritten into `base`'s (a `Checkpoint`) on-disk names; `renames` as `--rename` gives them."""
    from ..layouts.transformers import parse_rename

    rules = [parse_rename(text) for text in renames]
    return [to_disk_names(adapter, base.tensors, base.config, rules).adapter for adapter in adapters]


def _keep_tie(adapter: Adapter, items: list[Replacement], base: Mapping[str, TensorInfo], config) -> list[Replacement]:
    """A tied base whose embedding and lm_head the adapter replaces with equal copies stays tied: the head copy goes.

    (Unequal copies untie the base, with the planner's warning.)
    """
    tied, head = tied_embedding(base, config), head_name(config)
    whole = {item.target: item for item in items if item.rows is None}
    if tied is None or tied not in whole or head not in whole:
        return items
    import torch  # only here: a plain merge plans without torch (its import overlaps the copies)

    embedding, head_copy = whole[tied], whole[head]
    if not torch.equal(adapter.read(embedding.key), adapter.read(head_copy.key)):
        return items
    kept = replace(embedding, origin=f"{embedding.origin} {TIED}")
    return [kept if item is embedding else item for item in items if item is not head_copy]


def plan_in_memory_names(plan, config: dict | None, base: Mapping[str, TensorInfo]):
    """An extraction plan whose LoRA modules carry the in-memory names PEFT loads (`extract`, the reverse way).

    Expert weights, which transformers fuses in memory, become one `target_parameters` task per fused parameter
    (`expert_extraction`).
    """
    from ..layouts.expert_extraction import expert_tasks
    from ..layouts.transformers import to_memory_path

    _, layout = layout_for(config)
    if not layout.renames and not layout.experts:
        return plan
    rest, experts, skipped = expert_tasks(plan, layout, base)
    tasks = [replace(task, module=to_memory_path(task.module, layout)) for task in rest]
    return replace(plan, tasks=tasks + experts, skipped=skipped)
