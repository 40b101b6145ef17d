"""transformers' own conversion rules (`transformers/conversion_mapping.py`), read at runtime for model types
that lora_tools' table (`layouts.transformers.LAYOUTS`) does not list.

transformers describes, per model type, how checkpoint names become in-memory
names when it loads (WeightRenaming: a regex rename; WeightConverter: tensors
fused by operations); `save_pretrained` runs them backwards. Without a model
instance only part of that inverts safely, so only this subset is used:

- a WeightRenaming of one *unanchored literal* to another (Mixtral-style
  `.block_sparse_moe.` → `.mlp.`), reversed in reverse order;
- a WeightConverter that stacks per-expert Linear weights (`MergeModulelist(dim=0)`,
  then `Concatenate(dim=1)` for gate + up) into a fused expert parameter, read as
  a `FusedExperts` entry (its parts in the converter's source order).

Left out, with the reason kept in `HfLayout.left_out`: anchored prefix renames
(vision-language placements such as `^language_model` → `model.language_model`),
which transformers scopes to nested sub-models (`get_model_conversion_mapping`
needs the model instance: applied model-free they give wrong names), renames with
regex groups or alternations, and every other converter (transposes, rope
permutations, quantized experts). `tests/test_zoo_layouts.py` proves the table
against transformers' rules for every zoo architecture, with a model instance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .transformers import FusedExperts, Layout, Rename

__all__ = ["HfLayout", "transformers_layout"]

_META = re.compile(r"[\^$*+?()\[\]{}|\\]")


@dataclass(frozen=True)
class HfLayout:
    """A layout read from transformers: `source` names it (version, model type); `left_out` lists unused rules."""

    layout: Layout
    source: str
    left_out: tuple[str, ...] = ()


def _literal(pattern: str) -> str | None:
    """A transformers pattern as the literal it matches, or None when it is a real regex (or anchored)."""
    text = pattern.replace(r"\.", ".")
    return None if _META.search(text) else text


def _rename(rule) -> Rename | str:
    """The memory → disk inverse of a loading rename, or why it is left out."""
    sources, targets = rule._original_source_patterns, rule._original_target_patterns
    if len(sources) != 1 or len(targets) != 1:
        return f"{rule!r}: several patterns"
    disk, memory = _literal(sources[0]), _literal(targets[0])
    if disk is None or memory is None:
        return f"{rule!r}: anchored or regex pattern (transformers scopes these to nested sub-models)"
    boundary = r"(?!\w)" if re.search(r"\w$", memory) else ""  # transformers ends a name-final pattern on a boundary
    return Rename(re.escape(memory) + boundary, disk)


def _experts(rule) -> FusedExperts | str:
    """The fused expert parameter a stacking converter builds, or why it is left out."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    operations = [(type(op), getattr(op, "dim", None)) for op in rule.operations]
    stacking = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(rule.source_patterns) > 1 else [])
    target = re.search(r"experts\.(\w+)$", rule._original_target_patterns[0])
    parts = [re.search(r"experts\.\*\.(\w+)\.weight$", p) for p in rule._original_source_patterns]
    if operations != stacking or target is None or not all(parts) or len(rule._original_target_patterns) != 1:
        return f"{rule!r}: not a per-expert stacking lora_tools can invert"
    return FusedExperts(target[1], tuple(p[1] for p in parts))


@lru_cache(maxsize=32)
def transformers_layout(model_type: str | None) -> HfLayout | None:
    """The usable part of transformers' conversion rules for `model_type`, or None (no transformers, no rules)."""
    if not model_type:
        return None
    try:
        from transformers import __version__
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return None
    renames, experts, left_out = [], [], []
    for rule in get_checkpoint_conversion_mapping(model_type) or ():
        if type(rule) is WeightRenaming:
            found = _rename(rule)
            (renames if isinstance(found, Rename) else left_out).append(found)
        elif type(rule) is WeightConverter:
            found = _experts(rule)
            (experts if isinstance(found, FusedExperts) else left_out).append(found)
        else:
            left_out.append(f"{rule!r}: {type(rule).__name__} is not inverted")
    if not renames and not experts:
        return None
    layout = Layout(renames=tuple(reversed(renames)), experts=tuple(experts))
    return HfLayout(layout, f"transformers {__version__} conversion_mapping[{model_type!r}]", tuple(left_out))
