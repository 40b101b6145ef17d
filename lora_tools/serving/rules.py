"""What each serving engine rejects or silently ignores in an adapter: one table, `RULES`.

Each rule has a finder (adapter facts → the modules or tensors it concerns), the effect per
engine ("rejects": loading fails; "ignores": loads, but serves something else), the problem
and what to do. Engines' own settings (default rank limit, targets they can apply) are in `ENGINES`.

Checked against (source read 2026-11):
  vLLM 0.11   vllm/lora/peft_helper.py PEFTHelper.validate_legal (rank > max_lora_rank, bias, DoRA,
              modules_to_save), vllm/config/lora.py (max_lora_rank default 16), vllm/lora/models.py
              (unexpected target modules raise); embedding/lm_head LoRA went with the extra-vocab
              removal (vllm PR #28382).
  SGLang 0.5  python/sglang/srt/lora/lora_config.py (lm_head / embed_tokens "Not supported yet"),
              lora_manager.py (max_lora_rank defaults to the largest initial adapter's rank; the
              LoRA layers exist only for q/k/v/o, qkv, gate/up/down, gate_up).
  llama.cpp   convert_lora_to_gguf.py (non-lora_A/B tensors: "Not a lora_A or lora_B tensor",
              exit), src/llama-adapter.cpp (one alpha, scale = alpha / r; tensors must exist in
              the base GGUF); no rank limit; per-architecture layouts and refusals: layouts/gguf.py.
  mlx-lm 0.32 mlx_lm/tuner/utils.py linear_to_lora_layers / load_adapters (one rank and one
              scale in lora_parameters; shape mismatches raise; only lora_a, lora_b, m load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..adapters.model import Adapter

__all__ = ["Engine", "Rule", "Facts", "ENGINES", "RULES"]


@dataclass(frozen=True)
class Engine:
    name: str
    checked: str
    default_max_rank: int | None
    #: the adapter format the engine loads (lora_tools' format names).
    loads: str = "peft"
    #: module names (last path component) the engine can put LoRA on; None = any linear layer.
    targets: frozenset[str] | None = None


_SGLANG_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
)
ENGINES: dict[str, Engine] = {
    "vllm": Engine("vLLM", "vLLM 0.11", default_max_rank=16, loads="peft"),
    "sglang": Engine("SGLang", "SGLang 0.5", default_max_rank=None, loads="peft", targets=frozenset(_SGLANG_TARGETS)),
    "llama.cpp": Engine("llama.cpp", "llama.cpp master 2026-11 (gguf-py 0.19)", default_max_rank=None, loads="gguf"),
    "mlx": Engine("mlx-lm", "mlx-lm 0.32", default_max_rank=None, loads="mlx"),
}


@dataclass
class Facts:
    """What the rules look at: the adapter, the engine, the rank limit, and the base if given."""

    adapter: Adapter
    engine: Engine
    max_rank: int | None
    base_tensors: dict | None = None
    base_config: dict | None = None
    where: dict = field(default_factory=dict)


_EMBEDDING_LEAVES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "tok_embeddings", "output")


def _format(facts: Facts) -> list[str]:
    found = facts.adapter.format
    return [] if found == facts.engine.loads else [f"{found} adapter, {facts.engine.name} loads {facts.engine.loads}"]


def _replacements(facts: Facts) -> list[str]:
    return [f"{r.target} ({r.origin})" for r in facts.adapter.replacements]


def _embeddings(facts: Facts) -> list[str]:
    return [
        m.name for m in facts.adapter.modules if m.kind == "embedding" or m.name.rsplit(".", 1)[-1] in _EMBEDDING_LEAVES
    ]


def _dora(facts: Facts) -> list[str]:
    return [m.name for m in facts.adapter.modules if m.dora]


def _bias(facts: Facts) -> list[str]:
    return [m.name for m in facts.adapter.modules if m.bias_key is not None]


def _over_rank(facts: Facts) -> list[str]:
    limit = facts.max_rank
    return [f"{m.name} (rank {m.rank} > {limit})" for m in facts.adapter.modules if limit and m.rank > limit]


def _not_lora(facts: Facts) -> list[str]:
    return [f"{m.name} ({m.variant})" for m in facts.adapter.modules
            if (m.variant != "lora" or m.kind == "conv") and not _is_tuner(m)]  # fmt: skip


def _is_tuner(module) -> bool:
    from ..adapters.tuners import tuner_of_variant

    return tuner_of_variant(module.variant) is not None


def _peft_tuner(facts: Facts) -> list[str]:
    peft_type = facts.adapter.config.get("peft_type")
    return [f"{m.name} ({peft_type})" for m in facts.adapter.modules if _is_tuner(m)]


def _unsupported_targets(facts: Facts) -> list[str]:
    allowed = facts.engine.targets
    if allowed is None:
        return []
    return sorted({m.name.rsplit(".", 1)[-1] for m in facts.adapter.modules if m.name.rsplit(".", 1)[-1] not in allowed}
                  - set(_EMBEDDING_LEAVES))  # fmt: skip


def _no_gguf_name(facts: Facts) -> list[str]:
    if facts.base_config is None:
        return []
    from ..errors import UnsupportedError
    from ..layouts.gguf import gguf_problems, layout_for

    try:
        layout = layout_for(facts.base_config, "base")
    except UnsupportedError:
        architectures = facts.base_config.get("architectures") or ["(none)"]
        return [f"architecture {architectures[0]}"]
    return gguf_problems(layout, {m.name: (m.a_shape, m.b_shape) for m in facts.adapter.modules}, facts.base_config)


def _unmatched(facts: Facts) -> list[str]:
    if facts.base_tensors is None:
        return []
    from ..planning.targets import Targets, with_tied_head

    targets = Targets(with_tied_head(facts.base_tensors, facts.base_config))
    return [m.name for m in facts.adapter.modules if targets.find(m) is None]


def _mixed(values: set) -> bool:
    return len(values) > 1


def _mixed_ranks(facts: Facts) -> list[str]:
    ranks = {m.rank for m in facts.adapter.modules}
    return [f"ranks {sorted(ranks)}"] if _mixed(ranks) else []


def _mixed_scales(facts: Facts) -> list[str]:
    scales = {m.scale for m in facts.adapter.modules}
    return [f"scales {', '.join(f'{s:g}' for s in sorted(scales))}"] if _mixed(scales) else []


def _unknown(facts: Facts) -> list[str]:
    return list(facts.adapter.unknown_keys)


@dataclass(frozen=True)
class Rule:
    id: str
    find: Callable[[Facts], list[str]]
    effects: dict[str, str]  # engine → "rejects" | "ignores"
    problem: str
    fix: str


_ALL = ("vllm", "sglang", "llama.cpp", "mlx")


def _every(effect: str, *engines: str) -> dict[str, str]:
    return dict.fromkeys(engines or _ALL, effect)


RULES: tuple[Rule, ...] = (
    Rule("format", _format, _every("rejects"),
         "the engine does not load this file format",
         "loratool convert ADAPTER --to peft|gguf|mlx (gguf needs --base)"),
    Rule("modules_to_save", _replacements, {**_every("rejects"), "sglang": "ignores"},
         "whole tensors saved beside the LoRA (modules_to_save / trainable tokens) cannot be served as an adapter",
         "merge the adapter into the base (loratool merge) and serve the merged model"),
    Rule("embedding_lora", _embeddings, _every("rejects", "vllm", "sglang"),
         "LoRA on embeddings / lm_head is not applied by this engine",
         "merge those modules into the base (loratool merge), or retrain without them"),
    Rule("dora", _dora, {"vllm": "rejects", "sglang": "ignores", "llama.cpp": "rejects"},
         "DoRA magnitude vectors are not supported (served, they would be dropped)",
         "merge the adapter (loratool merge), or convert --to gguf --drop-unsupported to serve it as plain LoRA"),
    Rule("bias", _bias, {"vllm": "rejects", "sglang": "ignores", "llama.cpp": "rejects", "mlx": "rejects"},
         "lora_B biases are not supported",
         "merge the adapter (loratool merge); vLLM needs --enable-lora-bias"),
    Rule("rank_limit", _over_rank, _every("rejects", "vllm", "sglang"),
         "rank above the engine's max_lora_rank",
         "raise --max-lora-rank on the server, or loratool resize --rank N"),
    Rule("peft_tuner", _peft_tuner, _every("rejects"),
         "a PEFT tuner other than LoRA (AdaLoRA, IA3, OFT, VeRA, …): engines serve LoRA only",
         "loratool convert ADAPTER --to peft --base BASE -o LORA (exact for AdaLoRA and VeRA; add --rank N for "
         "the other tuners), then serve LORA; or loratool merge"),
    Rule("not_lora", _not_lora, _every("rejects"),
         "LoHa / LoKr / Tucker / conv modules are not LoRA on linear layers",
         "loratool convert --to peft --rank N (re-factorise), or merge"),
    Rule("unsupported_target", _unsupported_targets, _every("rejects", "sglang"),
         "the engine has no LoRA layer for these target modules",
         "retrain targeting q/k/v/o and gate/up/down projections, or merge"),
    Rule("no_gguf_tensor", _no_gguf_name, _every("rejects", "llama.cpp"),
         "llama.cpp's converter has no tensor for these modules, or refuses them (layouts.gguf's table)",
         "merge the adapter (loratool merge) and convert the merged model"),
    Rule("mixed_ranks", _mixed_ranks, _every("rejects", "mlx"),
         "mlx-lm adapters have one rank for every layer",
         "loratool resize --rank N"),
    Rule("mixed_scales", _mixed_scales, {"mlx": "rejects", "llama.cpp": "ignores"},
         "one scale (mlx-lm) / one alpha (llama.cpp) for every layer; per-module scales are lost",
         "convert --to gguf|mlx folds them into lora_b (use --bake-alpha for mlx)"),
    Rule("unmatched_target", _unmatched, _every("rejects"),
         "targets matching no module in BASE",
         "check the base model (loratool inspect ADAPTER --base BASE) or rename with loratool convert"),
    Rule("unknown_tensors", _unknown, _every("ignores"),
         "tensors lora_tools cannot read as LoRA; the engine will not apply them either",
         "loratool inspect ADAPTER to see them"),
)  # fmt: skip
