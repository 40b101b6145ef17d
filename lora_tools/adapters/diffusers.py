"""diffusers LoRA files: `unet.` / `transformer.` / `text_encoder.` prefixed keys, old and new spellings.

The reader takes PEFT-style `lora_A`/`lora_B` keys behind a component prefix, and the
older `lora.down`/`lora.up`, `lora_linear_layer` and attention-processor spellings.
The writer spells modules as diffusers' `load_lora_weights` reads them, with the
scale folded into B (diffusers LoRA files carry no alpha).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from ..io.checkpoint import open_checkpoint
from .model import Adapter, LoraModule, ModuleFactors, read_scalar, safetensors_names

if TYPE_CHECKING:
    from ..io.spool import Spool

__all__ = ["COMPONENT_PREFIXES", "detect", "read", "spool_module"]

#: diffusers key prefix → pipeline component.
COMPONENT_PREFIXES = {
    "unet.": "unet",
    "transformer.": "transformer",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "text_encoder_3.": "text_encoder_3",
    "vae.": "vae",
}


_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)  # fmt: skip


def _split_diffusers(key: str) -> tuple[str, str | None, str] | None:
    component = None
    for prefix, name in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            component, key = name, key[len(prefix) :]
            break
    for suffix, role in _DIFFUSERS_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            if suffix.startswith("_lora"):  # attention processors: attn1.processor.to_q_lora → attn1.to_q
                module = re.sub(r"\.processor\.", ".", module)
                module = re.sub(r"to_out$", "to_out.0", module)
            return module, component, role
    return None


def detect(path: Path) -> bool:
    names = safetensors_names(path)
    splits = [_split_diffusers(n) for n in names]
    has_old = any(".lora.down." in n or "lora_linear_layer" in n or "_lora.down." in n for n in names)
    has_component = any(s is not None and s[1] is not None for s in splits)
    return any(s is not None and s[2] == "down" for s in splits) and (has_old or has_component)


def read(path: Path, *, alpha: float | None = None):
    weights = open_checkpoint(path)
    grouped: dict[tuple[str | None, str], dict[str, str]] = {}
    unknown = []
    for key in weights.tensors:
        split = _split_diffusers(key)
        if split is None:
            unknown.append(key)
        else:
            grouped.setdefault((split[1], split[0]), {})[split[2]] = key
    modules = []
    for (component, name), roles in grouped.items():
        if "down" not in roles or "up" not in roles:
            unknown.extend(roles.values())
            continue
        down = weights.tensors[roles["down"]].shape
        rank = down[0]
        module_alpha = (
            alpha if alpha is not None else read_scalar(weights, roles["alpha"]) if "alpha" in roles else rank
        )
        modules.append(
            LoraModule(
                name=name,
                kind="conv" if len(down) > 2 else "linear",
                a_key=roles["down"],
                b_key=roles["up"],
                a_shape=down,
                b_shape=weights.tensors[roles["up"]].shape,
                rank=rank,
                alpha=float(module_alpha),
                scale=float(module_alpha) / rank,
                component=component,
            )
        )
    if not modules:
        raise InvalidInputError(f"{path}: no LoRA modules found")
    modules.sort(key=lambda m: (m.component or "", m.name))
    return Adapter(
        path=path, format="diffusers", modules=modules, replacements=[], unknown_keys=unknown, weights=weights
    )


# --- writing ------------------------------------------------------------------


def spool_module(spool: Spool, factors: ModuleFactors) -> None:
    """Spool one module under diffusers' keys (`{name}.lora_A.weight` …), its scale alpha/r folded into B."""
    key, down, up = factors.name, factors.down, factors.up
    scale = factors.alpha / down.shape[0]
    spool.add(f"{key}.lora_A.weight", down)
    spool.add(f"{key}.lora_B.weight", up if scale == 1 else (up.double() * scale).to(up.dtype))
    if factors.magnitude is not None:
        spool.add(f"{key}.lora_magnitude_vector", factors.magnitude.reshape(-1))
