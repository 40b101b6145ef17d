"""How llama.cpp's converter lays out each architecture's weights, for GGUF LoRA adapters: one row per architecture.

A GGUF LoRA names its tensors after the GGUF base tensor they adapt (`blk.0.attn_q.weight`),
from gguf-py's own per-architecture `TensorNameMap`. Whatever llama.cpp's HF converter does
to a base weight is done to the factors so that the product matches the converted base: the
Llama-family rotary row permutation of q/k reorders B's rows (A is untouched). Only the
base's config is needed.
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
    "GgufLayout",
    "gguf_module",
    "layout_for",
    "permute_rows",
    "unpermute_rows",
    "permutation_heads",
    "head_counts",
    "block_count",
    "gguf_names",
    "hf_candidates",
]


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp's HF converter lays out one architecture's weights.

    arch: the `gguf.MODEL_ARCH` member; `row_permutations`: HF projection → the config field
    giving the head count of the rotary permutation applied to that weight's rows.
    """

    arch: str
    row_permutations: tuple[tuple[str, str], ...] = ()


_LLAMA_ROTARY = (("q_proj", "num_attention_heads"), ("k_proj", "num_key_value_heads"))


#: HF architecture → layout. Checked against llama.cpp master (2026-11) `convert_hf_to_gguf.py` /
#: `conversion/`: LlamaModel (registered for Llama and Mistral) sets `undo_permute = True` and permutes
#: q_proj rows with n_head and k_proj rows with n_head_kv; Qwen2Model and Phi3MiniModel only rename
#: (Phi-3's fused qkv_proj → attn_qkv and gate_up_proj → ffn_up stay fused, as in the base GGUF).
GGUF_LAYOUTS: dict[str, GgufLayout] = {
    "LlamaForCausalLM": GgufLayout("LLAMA", _LLAMA_ROTARY),
    "MistralForCausalLM": GgufLayout("LLAMA", _LLAMA_ROTARY),
    "Qwen2ForCausalLM": GgufLayout("QWEN2"),
    "Phi3ForCausalLM": GgufLayout("PHI3"),
}


def gguf_module():
    """The `gguf` package, or an `EnvironmentProblem` saying how to install it."""
    try:
        import gguf
    except ImportError as exc:
        raise EnvironmentProblem("GGUF support needs the 'gguf' package: pip install 'lora_tools[gguf]'") from exc
    return gguf


def layout_for(config: dict, where: object) -> GgufLayout:
    """The layout of the base whose config.json is `config`."""
    architectures = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or []
    for name in architectures:
        if name in GGUF_LAYOUTS:
            return GGUF_LAYOUTS[name]
    raise UnsupportedError(
        f"{where}: architecture {', '.join(architectures) or '(none in config.json)'} has no GGUF LoRA layout here; "
        f"supported: {', '.join(sorted(GGUF_LAYOUTS))}"
    )


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute on the first axis: per head, split-half order → interleaved pairs."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `permute_rows`."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def permutation_heads(layout: GgufLayout, module: str, heads: dict[str, int]) -> int | None:
    for projection, field_name in layout.row_permutations:
        if module.endswith(f".{projection}") or module == projection:
            count = heads.get(field_name)
            if count is None and field_name == "num_key_value_heads":
                count = heads.get("num_attention_heads")
            return count
    return None


def head_counts(config: dict) -> dict[str, int]:
    text = config.get("text_config") or config
    return {k: int(text[k]) for k in ("num_attention_heads", "num_key_value_heads") if text.get(k) is not None}


def block_count(config: dict) -> int:
    text = config.get("text_config") or config
    return int(text.get("num_hidden_layers") or text.get("n_layer") or 0)


def gguf_names(modules: list[str], layout: GgufLayout, blocks: int) -> tuple[dict[str, str], list[str]]:
    """HF module path → GGUF base tensor name (`blk.0.attn_q.weight`), and the modules with none."""
    gguf = gguf_module()
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, layout.arch), blocks)
    names, missing = {}, []
    for module in modules:
        found = table.get_name(re.sub(r"^model\.language_model\.", "model.", module))
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
