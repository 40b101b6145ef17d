"""diffusers LoRA files: `unet.` / `transformer.` / `text_encoder.` prefixed keys, old and new spellings.

The reader takes PEFT-style `lora_A`/`lora_B` keys behind a component prefix, and the
older `lora.down`/`lora.up`, `lora_linear_layer` and attention-processor spellings.
The writer spells modules as diffusers' `load_lora_weights` reads them, with the
scale folded into B (diffusers LoRA files carry no alpha).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError
from ..io.checkpoint import PICKLE_SUFFIXES, load_pickle_state_dict, open_checkpoint
from .model import MAX_ALPHA, Adapter, LoraModule, ModuleFactors, read_scalar, safetensors_names
from .peft_rules import METADATA_KEY, metadata_config, pattern_key

if TYPE_CHECKING:
    from ..io.spool import Spool

__all__ = ["COMPONENT_PREFIXES", "WEIGHT_NAMES", "detect", "read", "spool_module"]

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
    (".alpha", "alpha"), (".lora_magnitude_vector", "magnitude"), (".lora_magnitude_vector.weight", "magnitude"),
)  # fmt: skip

#: The file names diffusers' training scripts and `save_lora_weights` write (safetensors since 0.15, pickle before).
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")


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


def _weights_file(path: Path) -> Path:
    """The LoRA file itself: `path`, or the `pytorch_lora_weights.*` a diffusers LoRA folder holds."""
    if path.is_dir():
        return next((path / name for name in WEIGHT_NAMES if (path / name).is_file()), path)
    return path


def _key_names(path: Path) -> list[str]:
    """Tensor names of a `.safetensors` file, or of a pickle (`pytorch_lora_weights.bin`, weights-only unpickling)."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and path.stat().st_size <= _MAX_PICKLE_PROBE:
        try:
            return list(load_pickle_state_dict(path))
        except InvalidInputError:
            return []  # unreadable or unsafe: not detected here; opening it as a checkpoint says why
    return safetensors_names(path)


#: A pickle larger than this is a model checkpoint, not a LoRA: not unpickled to probe its keys.
_MAX_PICKLE_PROBE = 2 << 30


def detect(path: Path) -> bool:
    names = _key_names(_weights_file(path))
    splits = [_split_diffusers(n) for n in names]
    has_old = any(".lora.down." in n or "lora_linear_layer" in n or "_lora.down." in n for n in names)
    has_component = any(s is not None and s[1] is not None for s in splits)
    return any(s is not None and s[2] == "down" for s in splits) and (has_old or has_component)


def read(path: Path, *, alpha: float | None = None):
    weights = open_checkpoint(_weights_file(path))
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
        module_alpha, rslora = _alpha(weights, component, name, roles, rank, alpha)
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
                scale=float(module_alpha) / (math.sqrt(rank) if rslora else rank),
                magnitude_key=roles.get("magnitude"),
                component=component,
            )
        )
    if not modules:
        raise InvalidInputError(f"{path}: no LoRA modules found")
    modules.sort(key=lambda m: (m.component or "", m.name))
    return Adapter(
        path=path, format="diffusers", modules=modules, replacements=[], unknown_keys=unknown, weights=weights
    )


def _alpha(weights, component: str | None, name: str, roles: dict, rank: int, override: float | None):
    """A module's alpha as diffusers reads it, and whether it is rsLoRA-scaled.

    In order: --alpha; the module's `.alpha` tensor; the PEFT config diffusers recorded in
    `lora_adapter_metadata` (its alpha_pattern, then lora_alpha); else alpha = rank (scale 1),
    diffusers' rule for a file that records no alpha.
    """
    if override is not None:
        return override, False
    if "alpha" in roles:
        return read_scalar(weights, roles["alpha"]), False
    recorded = metadata_config(weights.metadata, component)
    if recorded is None:
        return rank, False
    patterns = recorded.get("alpha_pattern") or {}
    key = pattern_key(patterns, name) if isinstance(patterns, dict) else None
    found = patterns[key] if key is not None else recorded.get("lora_alpha", rank)
    if isinstance(found, bool) or not isinstance(found, int | float) or not 0 < found <= MAX_ALPHA:
        raise CorruptFileError(weights.path, f"{METADATA_KEY}: lora_alpha for {name} must be a positive number")
    return found, bool(recorded.get("use_rslora", False))


# --- writing ------------------------------------------------------------------


def spool_module(spool: Spool, factors: ModuleFactors) -> None:
    """Spool one module under diffusers' keys (`{name}.lora_A.weight` …), its scale alpha/r folded into B."""
    key, down, up = factors.name, factors.down, factors.up
    scale = factors.alpha / down.shape[0]
    spool.add(f"{key}.lora_A.weight", down)
    spool.add(f"{key}.lora_B.weight", up if scale == 1 else (up.double() * scale).to(up.dtype))
    if factors.magnitude is not None:
        spool.add(f"{key}.lora_magnitude_vector", factors.magnitude.reshape(-1))
