"""Which base tensor an adapter module names: dotted or kohya paths, tied heads, fused layouts (pure).

Nothing here reads tensor data: functions take the `TensorInfo`s of headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from ..adapters.model import LoraModule
from ..io.safetensors_header import TensorInfo
from ..layouts.relayout import LayoutTargets, Located
from ..layouts.transformers import tied_names

__all__ = [
    "HEAD_NAME",
    "TIED",
    "resolve_module",
    "resolve_tensor",
    "Targets",
    "weight_tensor",
    "with_tied_head",
    "tied_embedding",
    "head_name",
]

HEAD_NAME = "lm_head.weight"  # a text model's; `head_name(config)` is the checkpoint's own (a VLM's is nested)


#: Ends the origin of an embedding replacement whose lm_head copy is identical, so the tie holds.
TIED = "(tied)"


def resolve_module(module: str, base_names: Mapping[str, object] | set[str]) -> str | None:
    """The base module path an adapter module names, or None.

    Tries the path as is, then with leading components dropped (adapters saved
    from a wrapper model), then base paths that extend it at the front (bases
    saved from a wrapper). A suffix that fits several base modules is None.
    """
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:])
        if f"{candidate}.weight" in base_names:
            return candidate
    matches = [n[: -len(".weight")] for n in base_names if n.endswith(f".{module}.weight")]
    return matches[0] if len(matches) == 1 else None


def with_tied_head(base: Mapping[str, TensorInfo], config: dict | None) -> Mapping[str, TensorInfo]:
    """`base` plus the lm_head a tied checkpoint omits, so adapters on lm_head find their target."""
    tied, head = tied_embedding(base, config), head_name(config)
    if tied is None:
        return base
    return {**base, head: replace(base[tied], name=head)}


class Targets:
    """Finds the base module an adapter module names: dotted paths, or kohya's underscored ones.

    kohya names are matched the way sd-scripts makes them: the base's own dotted
    module paths with dots turned into underscores (with or without a leading
    `text_model.`, which transformers versions disagree on). A name two base
    modules share is ambiguous and matches neither.
    """

    def __init__(self, base: Mapping[str, TensorInfo]) -> None:
        self.base = base
        self._kohya: dict[str, str | None] | None = None
        self.layout = LayoutTargets(base)

    def located(self, module: LoraModule) -> Located | None:
        """Where a module lands through the base's diffusion layout (the other naming, fused projections)."""
        if self.layout.layout is None or (not self.layout.original_side and self._own(module) is not None):
            return None
        return self.layout.locate(module)

    def find(self, module: LoraModule) -> str | None:
        if module.variant == "experts":  # names its fused tensor itself (`…experts.gate_up_proj`)
            return module.name if module.name in self.base else None
        located = self.located(module)
        return located.whole if located is not None else self._own(module)

    def _own(self, module: LoraModule) -> str | None:
        if not module.kohya_name:
            return resolve_module(module.name, self.base)
        return self.kohya_index().get(module.name)

    def ambiguous(self, module: LoraModule) -> bool:
        return module.kohya_name and module.name in self.kohya_index() and self.kohya_index()[module.name] is None

    def kohya_index(self) -> dict[str, str | None]:
        if self._kohya is None:
            index: dict[str, str | None] = {}
            for name in self.base:
                if not name.endswith(".weight"):
                    continue
                path = name[: -len(".weight")]
                spellings = {path.replace(".", "_")}
                if path.startswith("text_model."):
                    spellings.add(path[len("text_model.") :].replace(".", "_"))
                else:
                    spellings.add("text_model_" + path.replace(".", "_"))
                for spelling in spellings:
                    index[spelling] = path if index.get(spelling, path) == path else None
            self._kohya = index
        return self._kohya


def weight_tensor(module: LoraModule, target: str) -> str:
    """The base tensor a module's ΔW lands on: `{target}.weight`, or a fused experts tensor itself."""
    return target if module.variant == "experts" else f"{target}.weight"


def resolve_tensor(name: str, base: Mapping[str, TensorInfo]) -> str | None:
    if name in base:
        return name
    module, _, leaf = name.rpartition(".")
    resolved = resolve_module(module, base) if leaf == "weight" else None
    return f"{resolved}.weight" if resolved is not None else None


def tied_embedding(base: Mapping[str, TensorInfo], config: dict | None) -> str | None:
    """The input-embedding tensor lm_head shares, when the base ties them and omits lm_head."""
    embeddings, head = tied_names(config)
    if head in base or not (config or {}).get("tie_word_embeddings", True):
        return None
    return next((name for name in embeddings if name in base), None)


def head_name(config: dict | None) -> str:
    """The lm_head tensor as the checkpoint names it (`language_model.lm_head.weight` for a Llava or Gemma 3)."""
    return tied_names(config)[1]
