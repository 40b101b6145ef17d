"""How llama.cpp's converter lays out each architecture's weights, for GGUF LoRA adapters: one row per architecture.

A GGUF LoRA names its tensors after the GGUF base tensor they adapt (`blk.0.attn_q.weight`),
from gguf-py's own per-architecture `TensorNameMap`. Whatever llama.cpp's HF converter
(`convert_hf_to_gguf.py` and its `conversion/` package, per-model `modify_tensors`) does to a
base weight, its `convert_lora_to_gguf.py` does to the factors so that B·A matches the
converted base, and so do we:

- a row reordering of the weight (the rotary q/k permutation of `LlamaModel.permute`, Falcon's
  regrouping of its fused query_key_value) reorders B's rows; A is untouched;
- per-expert weights stacked into one 3-D `*_exps` tensor stack A [E, r, in] and B [E, out, r];
- a rename is gguf-py's table.

Where llama.cpp's LoRA converter stops (a fused expert parameter, DeepSeek's split kv_b_proj),
the row says so and we refuse the same tensors with its reason. Only the base's config is needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import EnvironmentProblem, UnsupportedError

if TYPE_CHECKING:
    import torch

__all__ = [
    "GGUF_LAYOUTS",
    "LLAMA_CPP_REFERENCE",
    "GgufLayout",
    "RowOrder",
    "ExpertStack",
    "Refusal",
    "gguf_module",
    "layout_for",
    "layout_of_arch",
    "row_order",
    "reorder_rows",
    "restore_rows",
    "head_counts",
    "block_count",
    "gguf_names",
    "hf_candidates",
    "refused",
    "expert_slot",
    "expert_count",
    "expert_groups",
    "gguf_problems",
    "FusedExperts",
    "ExpertPart",
    "fused_parts",
    "describe",
]

#: The llama.cpp the table was read from and is tested against (tests/llama_cpp_converter.py restores it).
LLAMA_CPP_REFERENCE = "llama.cpp as vendored by llama-cpp-python 0.3.36"


@dataclass(frozen=True)
class RowOrder:
    """llama.cpp reorders the rows of `projection`'s weight; B's rows follow, A is untouched.

    order: "rotary" (`LlamaModel.permute`: per head, split halves → interleaved pairs; k uses the
    kv head count) or "kv_groups" (Falcon: n_kv groups of [g q heads, k, v] → all q, all k, all v).
    """

    projection: str
    order: str
    kv: bool = False


@dataclass(frozen=True)
class ExpertStack:
    """Per-expert linear LoRAs that llama.cpp stacks into one `*_exps` tensor (`torch.stack` of A and of B).

    pattern: a regex over the HF module path with groups `layer`, `expert`, `projection`;
    stacked: the name llama.cpp gives the stacked weight before renaming (gguf-py maps it);
    count: config fields holding the number of experts (the first present is used).
    """

    pattern: str
    stacked: str
    count: tuple[str, ...]
    label: str


@dataclass(frozen=True)
class FusedExperts:
    """PEFT's LoRA on transformers 5's fused experts, split into the per-expert modules llama.cpp stacks.

    transformers 5 keeps `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I] as parameters; PEFT's
    `target_parameters` LoRA on them has A [E·r, in] and B [out, E·r] (expert e: A rows e·r…, B columns
    e::E; layouts.experts). llama.cpp's converter refuses such a LoRA, but its loader applies stacked
    3-D factors to `*_exps` (llama-graph.cpp `build_lora_mm_id`), so each expert's B_e·A_e is written as
    the per-expert modules `gate`, `up` (the halves of gate_up_proj's rows) and `down` would be.

    module: regex over the HF module path (group `layer`); gate/up/down: per-expert module templates.
    """

    module: str
    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class Refusal:
    """Modules (regex on the HF module path) whose LoRA llama.cpp's `convert_lora_to_gguf.py` does not convert."""

    pattern: str
    what: str
    reason: str


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp's HF converter lays out one architecture's weights.

    arch: the `gguf.MODEL_ARCH` member; family: how the README names it; rows: row reorderings;
    experts: how per-expert LoRAs are stacked; refusals: what llama.cpp refuses; heads/kv_heads:
    the config fields llama.cpp reads for the head counts (`find_hparam`, first present wins).
    """

    arch: str
    family: str
    rows: tuple[RowOrder, ...] = ()
    experts: ExpertStack | None = None
    refusals: tuple[Refusal, ...] = ()
    fused: FusedExperts | None = None
    heads: tuple[str, ...] = ("num_attention_heads", "n_head")
    kv_heads: tuple[str, ...] = ("num_key_value_heads", "num_kv_heads", "n_head_kv")


_ROTARY = (RowOrder("q_proj", "rotary"), RowOrder("k_proj", "rotary", kv=True))
#: PEFT's LoRA on a fused expert parameter (`target_parameters`, or all-linear on transformers 5 MoE blocks):
#: llama.cpp maps it to no tensor ("Can not map tensor …experts…") or waits for per-expert weights that never
#: come ("Unprocessed experts").
_FUSED_EXPERTS = Refusal(
    r"\.experts(\.base_layer)*$",
    "LoRA on fused experts",
    "a LoRA on fused expert parameters (PEFT target_parameters), which llama.cpp's convert_lora_to_gguf.py "
    "cannot convert ('Unprocessed experts'); train the LoRA on the attention/dense layers, or merge it",
)
_MIXTRAL_EXPERTS = ExpertStack(
    r"^model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.(?P<projection>w[123])$",
    "layers.{layer}.feed_forward.experts.{projection}",
    ("num_local_experts",),
    "w1/w2/w3",
)
_QWEN_EXPERTS = ExpertStack(
    r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<projection>gate_proj|up_proj|down_proj)$",
    "model.layers.{layer}.mlp.experts.{projection}",
    ("num_local_experts", "num_experts"),
    "gate/up/down_proj",
)
_FUSED_MODULE = r"^model\.layers\.(?P<layer>\d+)\.mlp\.experts(\.base_layer)*$"
_MIXTRAL_FUSED = FusedExperts(
    _FUSED_MODULE, *(f"model.layers.{{layer}}.block_sparse_moe.experts.{{expert}}.{w}" for w in ("w1", "w3", "w2"))
)
_QWEN_FUSED = FusedExperts(
    _FUSED_MODULE, *(f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}_proj" for p in ("gate", "up", "down"))
)
_GEMMA_LM_HEAD = Refusal(
    r"^lm_head$",
    "lm_head",
    "lm_head, which llama.cpp's Gemma / Gemma 2 converters skip (the output is the tied embedding): its "
    "convert_lora_to_gguf.py leaves this LoRA out without a word",
)
_DEEPSEEK_KV_B = Refusal(
    r"\.self_attn\.kv_b_proj$",
    "kv_b_proj",
    "DeepSeek's kv_b_proj, which llama.cpp splits into attn_k_b/attn_v_b through a per-head transpose its "
    "convert_lora_to_gguf.py cannot apply to LoRA factors (NotImplementedError)",
)

# fmt: off
#: HF architecture → layout, read from the per-model classes of llama.cpp's `conversion/` package
#: (`LLAMA_CPP_REFERENCE`): LlamaModel (Llama, Mistral, Mixtral; GraniteModel is one) and OlmoModel permute
#: q/k rows; FalconModel regroups query_key_value; Qwen2Moe/Qwen3Moe and LlamaModel (Mixtral) stack per-expert
#: weights; the others only rename (fused qkv_proj/gate_up_proj stay fused, as in the base GGUF). `fused` is
#: ours: llama.cpp's converter refuses PEFT's LoRA on fused experts, its loader applies what we write for it.
GGUF_LAYOUTS: dict[str, GgufLayout] = {
    "LlamaForCausalLM": GgufLayout("LLAMA", "Llama 2/3/3.x", _ROTARY),
    "MistralForCausalLM": GgufLayout("LLAMA", "Mistral", _ROTARY),
    "MixtralForCausalLM": GgufLayout("LLAMA", "Mixtral", _ROTARY, _MIXTRAL_EXPERTS, fused=_MIXTRAL_FUSED),
    "Qwen2ForCausalLM": GgufLayout("QWEN2", "Qwen2 / Qwen2.5"),
    "Qwen2MoeForCausalLM": GgufLayout("QWEN2MOE", "Qwen2-MoE", (), _QWEN_EXPERTS, fused=_QWEN_FUSED),
    "Qwen3ForCausalLM": GgufLayout("QWEN3", "Qwen3"),
    "Qwen3MoeForCausalLM": GgufLayout("QWEN3MOE", "Qwen3-MoE", (), _QWEN_EXPERTS, fused=_QWEN_FUSED),
    "GemmaForCausalLM": GgufLayout("GEMMA", "Gemma", refusals=(_GEMMA_LM_HEAD,)),
    "Gemma2ForCausalLM": GgufLayout("GEMMA2", "Gemma 2", refusals=(_GEMMA_LM_HEAD,)),
    "Gemma3ForCausalLM": GgufLayout("GEMMA3", "Gemma 3 (text)"),
    "Gemma3ForConditionalGeneration": GgufLayout("GEMMA3", "Gemma 3 (text)"),
    "PhiForCausalLM": GgufLayout("PHI2", "Phi-2"),
    "Phi3ForCausalLM": GgufLayout("PHI3", "Phi-3"),
    "Starcoder2ForCausalLM": GgufLayout("STARCODER2", "StarCoder2"),
    "FalconForCausalLM": GgufLayout("FALCON", "Falcon", (RowOrder("query_key_value", "kv_groups"),),
                                    kv_heads=("num_kv_heads", "n_head_kv")),
    "StableLmForCausalLM": GgufLayout("STABLELM", "StableLM"),
    "OlmoForCausalLM": GgufLayout("OLMO", "OLMo", _ROTARY),
    "Olmo2ForCausalLM": GgufLayout("OLMO2", "OLMo 2"),
    "GraniteForCausalLM": GgufLayout("GRANITE", "Granite", _ROTARY),
    "CohereForCausalLM": GgufLayout("COMMAND_R", "Command-R"),
    "Glm4ForCausalLM": GgufLayout("GLM4", "GLM-4"),
    "GptOssForCausalLM": GgufLayout("GPT_OSS", "GPT-OSS", refusals=(_FUSED_EXPERTS,)),
    "DeepseekV2ForCausalLM": GgufLayout("DEEPSEEK2", "DeepSeek-V2", refusals=(_FUSED_EXPERTS, _DEEPSEEK_KV_B)),
    "DeepseekV3ForCausalLM": GgufLayout("DEEPSEEK2", "DeepSeek-V3", refusals=(_FUSED_EXPERTS, _DEEPSEEK_KV_B)),
}
# fmt: on


def gguf_module():
    """The `gguf` package, or an `EnvironmentProblem` saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise EnvironmentProblem("GGUF support needs the 'gguf' package: pip install 'lora_tools[gguf]'") from exc
    return gguf


def _text(config: dict) -> dict:
    return config.get("text_config") or config


def layout_for(config: dict, where: object) -> GgufLayout:
    """The layout of the base whose config.json is `config`."""
    architectures = [*(_text(config).get("architectures") or []), *(config.get("architectures") or [])]
    for name in architectures:
        if name in GGUF_LAYOUTS:
            return GGUF_LAYOUTS[name]
    raise UnsupportedError(
        f"{where}: architecture {', '.join(architectures) or '(none in config.json)'} has no GGUF LoRA layout here; "
        f"supported: {', '.join(sorted(GGUF_LAYOUTS))}"
    )


def layout_of_arch(arch: str) -> GgufLayout:
    """The first layout for a `gguf.MODEL_ARCH` member (reading a file that names only its GGUF architecture)."""
    layouts = [v for v in GGUF_LAYOUTS.values() if v.arch == arch] or [GgufLayout(arch, arch)]
    return next((v for v in layouts if v.experts is not None), layouts[0])  # Mixtral's row over Llama's


def _first(config: dict, fields: tuple[str, ...]) -> int | None:
    text = _text(config)
    return next((int(text[f]) for f in fields if text.get(f) is not None), None)


def head_counts(layout: GgufLayout, config: dict) -> dict[str, int]:
    """{"heads": n, "kv_heads": n_kv} as llama.cpp reads them from `config` (those present)."""
    found = {"heads": _first(config, layout.heads), "kv_heads": _first(config, layout.kv_heads)}
    return {k: v for k, v in found.items() if v is not None}


def _rule(layout: GgufLayout, module: str) -> RowOrder | None:
    return next((r for r in layout.rows if module.endswith(f".{r.projection}") or module == r.projection), None)


def row_order(layout: GgufLayout, module: str, rows: int, heads: dict[str, int]) -> list[int] | None:
    """Pure: the source row of each GGUF row of `module`'s weight (None when llama.cpp keeps the order).

    Raises KeyError naming the head count when it is needed and absent.
    """
    rule = _rule(layout, module)
    if rule is None:
        return None
    if rule.order == "rotary":
        # LlamaModel.permute: n_head_kv replaces n_head when they differ (k_proj)
        count = heads.get("kv_heads", heads["heads"]) if rule.kv else heads["heads"]
        size = rows // count
        return [h * size + t * (size // 2) + i for h in range(count) for i in range(size // 2) for t in (0, 1)]
    # kv_groups (FalconModel): view(n_kv, n_head // n_kv + 2, head_dim, ·); q = [:, :-2], k = [:, -2], v = [:, -1]
    count, groups = heads["heads"], heads.get("kv_heads", 1)
    per = count // groups + 2
    head_dim = rows // (groups * per)
    block = [[(g * per + j) * head_dim + d for d in range(head_dim)] for g in range(groups) for j in range(per)]
    q = [row for g in range(groups) for j in range(per - 2) for row in block[g * per + j]]
    k = [row for g in range(groups) for row in block[g * per + per - 2]]
    v = [row for g in range(groups) for row in block[g * per + per - 1]]
    return q + k + v


def reorder_rows(tensor: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """Rows of `tensor` in llama.cpp's order (first axis)."""
    import torch

    return tensor if order is None else tensor[torch.tensor(order)]


def restore_rows(tensor: torch.Tensor, order: list[int] | None) -> torch.Tensor:
    """The inverse of `reorder_rows`."""
    import torch

    if order is None:
        return tensor
    restored = torch.empty_like(tensor)
    restored[torch.tensor(order)] = tensor
    return restored


def block_count(config: dict) -> int:
    text = _text(config)
    return int(text.get("num_hidden_layers") or text.get("n_layer") or 0)


def expert_count(layout: GgufLayout, config: dict) -> int | None:
    return None if layout.experts is None else _first(config, layout.experts.count)


def expert_slot(layout: GgufLayout, module: str) -> tuple[str, int] | None:
    """(the stacked weight's pre-rename HF name, the expert index) when `module` is one expert's linear."""
    if layout.experts is None or (found := re.match(layout.experts.pattern, module)) is None:
        return None
    stacked = layout.experts.stacked.format(layer=found["layer"], projection=found["projection"])
    return stacked, int(found["expert"])


def refused(layout: GgufLayout, modules: list[str]) -> list[str]:
    """'module: reason' for each module whose LoRA llama.cpp's converter refuses."""
    return [
        f"{m}: {rule.reason}"
        for m in modules
        if (rule := next((r for r in layout.refusals if re.search(r.pattern, m)), None)) is not None
    ]


def gguf_names(modules: list[str], layout: GgufLayout, blocks: int) -> tuple[dict[str, str], list[str]]:
    """HF module path (or a stacked-experts name) → GGUF base tensor name (`blk.0.attn_q.weight`), and the misses."""
    gguf = gguf_module()
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), blocks)
    names, missing = {}, []
    for module in modules:
        slot = expert_slot(layout, module)
        found = table.get_name(re.sub(r"^model\.language_model\.", "model.", slot[0] if slot else module))
        if found is None:
            missing.append(module)
        else:
            names[module] = f"{found}.weight"
    return names, missing


def hf_candidates(arch: str, blocks: int) -> dict[str, list[str]]:
    """GGUF base tensor → the HF module paths gguf-py maps to it, transformers' `model.…` spelling first."""
    gguf = gguf_module()
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), blocks)
    found: dict[str, list[str]] = {}
    for key, (_, name) in table.mapping.items():
        if key != name:
            found.setdefault(f"{name}.weight", []).append(key)
    preferred = ("model.layers.", "model.embed_tokens", "model.norm", "lm_head")
    for candidates in found.values():
        candidates.sort(key=lambda k: next((i for i, p in enumerate(preferred) if k.startswith(p)), len(preferred)))
    return found


def expert_groups(layout: GgufLayout, modules: list[str]) -> dict[str, dict[int, str]]:
    """Pure: stacked-experts name → {expert index: module} for the modules that are one expert's linear."""
    groups: dict[str, dict[int, str]] = {}
    for module in modules:
        if (slot := expert_slot(layout, module)) is not None:
            groups.setdefault(slot[0], {})[slot[1]] = module
    return groups


@dataclass(frozen=True)
class ExpertPart:
    """Expert `expert` of a fused-experts module (on parameter `param`), rows [start, stop) of its B_e·A_e,
    written as module `name`."""

    name: str
    param: str
    expert: int
    experts: int
    start: int
    stop: int


def fused_parts(
    layout: GgufLayout, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], config: dict
) -> list[ExpertPart] | str | None:
    """Pure: the per-expert pieces of a LoRA on fused experts (None: not one; a string: why it cannot be split)."""
    if layout.fused is None or (found := re.match(layout.fused.module, module)) is None:
        return None
    text = _text(config)
    experts = expert_count(layout, config)
    hidden, inner = text.get("hidden_size"), text.get("moe_intermediate_size") or text.get("intermediate_size")
    if not experts or not hidden or not inner or a_shape[0] % experts or b_shape[1] != a_shape[0]:
        return f"A {list(a_shape)} / B {list(b_shape)} are not [E·r, in] / [out, E·r] with E={experts}"
    if (a_shape[1], b_shape[0]) == (hidden, 2 * inner):  # gate_up_proj [E, 2I, H]: gate rows first
        param, parts = "gate_up_proj", ((layout.fused.gate, 0, inner), (layout.fused.up, inner, 2 * inner))
    elif (a_shape[1], b_shape[0]) == (inner, hidden):  # down_proj [E, H, I]
        param, parts = "down_proj", ((layout.fused.down, 0, hidden),)
    else:
        return f"A {list(a_shape)} / B {list(b_shape)} fit neither gate_up_proj [E, 2I, H] nor down_proj [E, H, I]"
    return [
        ExpertPart(template.format(layer=found["layer"], expert=e), param, e, experts, start, stop)
        for e in range(experts)
        for template, start, stop in parts
    ]


def gguf_problems(
    layout: GgufLayout, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], config: dict
) -> list[str]:
    """Pure: why llama.cpp could not carry these modules (module → (A shape, B shape)), one line each; empty
    when it can.

    Refused modules (the layout's `refusals`), fused experts that do not split, modules with no GGUF
    tensor, and expert stacks that are not one LoRA of one rank on every expert (llama.cpp stacks them
    with `torch.stack`).
    """
    problems, ranks = [], {}
    for module, (a_shape, b_shape) in shapes.items():
        parts = fused_parts(layout, module, a_shape, b_shape, config)
        if isinstance(parts, str):
            problems.append(f"{module}: fused experts whose {parts}")
        elif parts is not None:
            ranks.update({p.name: a_shape[0] // p.experts for p in parts})
        else:
            ranks[module] = a_shape[0]
    problems += refused(layout, list(ranks))
    taken = {p.split(":", 1)[0] for p in problems}
    rest = [m for m in ranks if m not in taken]
    missing = gguf_names(rest, layout, block_count(config))[1]
    problems += [f"{m}: no GGUF tensor in llama.cpp's {layout.arch.lower()} layout" for m in missing]
    count = expert_count(layout, config)
    for stacked, members in expert_groups(layout, [m for m in rest if m not in missing]).items():
        have = sorted(members)
        if count is not None and have != list(range(count)):
            problems.append(
                f"{stacked}: llama.cpp stacks the experts into one tensor and needs a LoRA on each of the {count} "
                f"experts; found {len(have)}"
            )
        elif len({ranks[m] for m in members.values()}) > 1:
            problems.append(f"{stacked}: llama.cpp stacks the experts into one tensor; their LoRA ranks differ")
    return problems


_ORDERS = {"rotary": "rotary row permutation", "kv_groups": "rows regrouped from kv groups into q, k, v"}


def describe(layout: GgufLayout) -> str:
    """What llama.cpp's converter does to this architecture's LoRA factors, in a line (the README's table)."""
    parts = [f"{'/'.join(r.projection for r in layout.rows if r.order == order)}: {text} of B"
             for order, text in _ORDERS.items() if any(r.order == order for r in layout.rows)]  # fmt: skip
    if layout.experts is not None:
        fused = " (also split from a LoRA on fused experts)" if layout.fused is not None else ""
        parts.append(f"per-expert {layout.experts.label} LoRAs stacked into `*_exps`{fused}")
    parts += [f"refuses {r.what}" for r in layout.refusals]
    return "; ".join(parts) or "renames only"
