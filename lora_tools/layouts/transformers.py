"""transformers' in-memory module names ↔ the names its checkpoints keep on disk, per model type.

PEFT saves adapters with the names a model has in memory; since transformers
4.52 / v5 these differ from the checkpoint's for whole families: vision-language
models nest the language model differently, and MoE experts are fused in memory
(`mlp.experts.gate_up_proj` [E, 2I, H]) but stored per expert on disk. The table
below says, per `model_type`, how an in-memory module path becomes the on-disk
one (the reverse of transformers' conversion mapping, which `save_pretrained`
applies); `tests/test_zoo.py` proves every entry against what `save_pretrained`
writes for a real tiny model of that type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Rename", "FusedExperts", "Layout", "LAYOUTS", "layout_for", "parse_rename", "to_disk_path", "disk_tensor_names",
    "inverse", "to_memory_path", "is_expert_tensor", "MEMORY_EMBEDDINGS", "tied_names",
]  # fmt: skip


@dataclass(frozen=True)
class Rename:
    """In-memory module paths matching `memory` (a regex) are stored as `re.sub(memory, disk, path)`."""

    memory: str
    disk: str

    def apply(self, path: str) -> str | None:
        """The renamed path, or None when the rule does not match."""
        renamed, count = re.subn(self.memory, self.disk, path, count=1)
        return renamed if count else None

    def __str__(self) -> str:
        return f"{self.memory} → {self.disk}"


@dataclass(frozen=True)
class FusedExperts:
    """A fused expert parameter `{experts}.{param}` of shape [E, d1, d2].

    Attributes:
        param: the parameter's name on the experts module (`gate_up_proj`, `down_proj`).
        parts: the per-expert on-disk modules its output rows split into, in order
            (`{experts}.{e}.{part}.weight`); empty when the checkpoint keeps the fused tensor.
        in_first: laid out [E, in, out] (transformers' `is_transposed`) instead of [E, out, in].
        linear: the per-expert Linear modules (`{experts}.{e}.{name}`, as per-expert models name them) whose
            output rows make up the parameter when the checkpoint keeps it fused (`expert_linears`).
        interleaved: those modules' rows alternate along the out axis (gpt-oss: gate at even, up at odd
            columns) instead of following one another.
    """

    param: str
    parts: tuple[str, ...] = ()
    in_first: bool = False
    linear: tuple[str, ...] = ()
    interleaved: bool = False


@dataclass(frozen=True)
class Layout:
    """How one model type's in-memory names map to disk: renames (applied in order), then fused experts.

    `routers` are in-memory module paths (dotted suffixes) that transformers keeps as a bare `weight` parameter,
    not an nn.Linear (MoE routers): PEFT adapts them through `target_parameters` `<module>.weight`.
    """

    renames: tuple[Rename, ...] = ()
    experts: tuple[FusedExperts, ...] = ()
    routers: tuple[str, ...] = ()

    def is_router(self, module: str) -> bool:
        return any(module == r or module.endswith(f".{r}") for r in self.routers)


_LLAVA = Layout(
    renames=(
        Rename(r"^model\.language_model\.", "language_model.model."),
        Rename(r"^lm_head\b", "language_model.lm_head"),
        Rename(r"^model\.vision_tower\.", "vision_tower."),
        Rename(r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    )
)
_QWEN_VL = Layout(renames=(Rename(r"^model\.language_model\.", "model."), Rename(r"^model\.visual\.", "visual.")))
_PER_EXPERT = (FusedExperts("gate_up_proj", ("gate_proj", "up_proj")), FusedExperts("down_proj", ("down_proj",)))
_QWEN_MOE = Layout(experts=_PER_EXPERT, routers=("mlp.gate",))
_MIXTRAL = Layout(
    renames=(Rename(r"\.mlp\.", ".block_sparse_moe."),),
    experts=(FusedExperts("gate_up_proj", ("w1", "w3")), FusedExperts("down_proj", ("w2",))),
    routers=("mlp.gate",),
)
_GPT_OSS = Layout(
    experts=(  # GptOssExperts._apply_gate: gate = gate_up[..., ::2], up = gate_up[..., 1::2]
        FusedExperts("gate_up_proj", in_first=True, linear=("gate_proj", "up_proj"), interleaved=True),
        FusedExperts("down_proj", in_first=True, linear=("down_proj",)),
    ),
    routers=("mlp.router",),
)

#: model_type → layout, for the types whose in-memory names differ from the checkpoint's.
LAYOUTS: dict[str, Layout] = {
    "llava": _LLAVA,
    "gemma3": _LLAVA,
    "mistral3": _LLAVA,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "mixtral": _MIXTRAL,
    "qwen2_moe": _QWEN_MOE,
    "qwen3_moe": _QWEN_MOE,
    "deepseek_v3": _QWEN_MOE,
    "gpt_oss": _GPT_OSS,
}


def layout_for(config: dict | None) -> tuple[str | None, Layout]:
    """The model type named by a checkpoint's config.json and its layout (empty when names agree)."""
    model_type = (config or {}).get("model_type")
    return model_type, LAYOUTS.get(model_type, Layout())


def to_disk_path(path: str, renames: tuple[Rename, ...]) -> tuple[str, list[Rename]]:
    """Apply every matching rename in order; returns the new path and the rules that fired."""
    fired = []
    path += "."  # so `^model\.visual\.` also renames the module `model.visual` itself
    for rule in renames:
        renamed = rule.apply(path)
        if renamed is not None:
            path = renamed
            fired.append(rule)
    return path[:-1], fired


def parse_rename(text: str) -> Rename:
    """`'REGEX=REPLACEMENT'` (the `--rename` option) → a `Rename`.

    Raises:
        OptionValueError: no `=`, or the regex does not compile (a usage error, exit 2).
    """
    from ..errors import OptionValueError

    pattern, sep, replacement = text.partition("=")
    if not sep or not pattern:
        example = r"'^model\.language_model\.=model.'"
        raise OptionValueError(f"--rename {text!r}: expected REGEX=REPLACEMENT, e.g. {example}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise OptionValueError(f"--rename {text!r}: {pattern!r} is not a valid regular expression ({exc})") from exc
    return Rename(pattern, replacement)


def disk_tensor_names(memory_name: str, layout: Layout, experts: int) -> list[str]:
    """The on-disk tensor(s) that hold one in-memory tensor (`experts` = E, for fused expert parameters).

    `model.layers.0.mlp.experts.gate_up_proj` of a Mixtral → `model.layers.0.block_sparse_moe.experts.{e}.w1.weight`
    and `….w3.weight` for every e; any other name → its renamed self.
    """
    module, _, leaf = memory_name.rpartition(".")
    disk_module, _ = to_disk_path(module, layout.renames)
    spec = next((s for s in layout.experts if s.param == leaf and module.endswith("experts")), None)
    if spec is None:
        return [to_disk_path(memory_name, layout.renames)[0]]
    if not spec.parts:
        return [f"{disk_module}.{leaf}"]
    return [f"{disk_module}.{e}.{part}.weight" for e in range(experts) for part in spec.parts]


def _literal(pattern: str) -> tuple[str, bool, bool]:
    """A rename's regex as (literal text, anchored at the start, ends at a word boundary)."""
    anchored, bounded = pattern.startswith("^"), pattern.endswith(r"\b")
    core = pattern[int(anchored) : len(pattern) - 2 * bounded]
    return re.sub(r"\\(.)", r"\1", core), anchored, bounded


def inverse(rule: Rename) -> Rename:
    """The on-disk → in-memory rule of a table rename (the table's regexes are literals, maybe anchored)."""
    memory, anchored, bounded = _literal(rule.memory)
    return Rename(("^" if anchored else "") + re.escape(rule.disk) + (r"\b" if bounded else ""), memory)


def to_memory_path(path: str, layout: Layout) -> str:
    """An on-disk module path as the model names it in memory (what PEFT adapters must say)."""
    for rule in reversed(layout.renames):  # the forward rules touch disjoint prefixes: one inverse applies
        renamed = inverse(rule).apply(path + ".")
        if renamed is not None:
            return renamed[:-1]
    return path


def is_expert_tensor(disk_name: str, layout: Layout) -> bool:
    """A per-expert (or fused) expert weight on disk, which transformers fuses in memory."""
    for spec in layout.experts:
        if spec.parts and re.search(rf"\.experts\.\d+\.({'|'.join(map(re.escape, spec.parts))})\.weight$", disk_name):
            return True
        if not spec.parts and disk_name.endswith(f".experts.{spec.param}"):
            return True
    return False


#: In-memory names of the input embedding an lm_head may be tied to: decoder-only models, seq2seq decoders, and
#: the language model of a v5 vision-language model.
MEMORY_EMBEDDINGS = ("model.embed_tokens", "transformer.wte", "model.decoder.embed_tokens", "gpt_neox.embed_in",
                     "embed_tokens", "wte", "model.language_model.embed_tokens")  # fmt: skip


def tied_names(config: dict | None) -> tuple[tuple[str, ...], str]:
    """The on-disk tensors a tied checkpoint shares: (input-embedding candidates, the lm_head it omits).

    Derived from the layout, so a VLM stores `language_model.model.embed_tokens.weight` and
    `language_model.lm_head.weight` (Llava, Gemma 3) where a text model keeps `model.embed_tokens.weight` and
    `lm_head.weight`.
    """
    _, layout = layout_for(config)
    embeddings = dict.fromkeys(to_disk_path(name, layout.renames)[0] + ".weight" for name in MEMORY_EMBEDDINGS)
    return tuple(embeddings), to_disk_path("lm_head", layout.renames)[0] + ".weight"
