"""kohya / sd-scripts adapter files (LoRA, LoCon, Tucker) and LyCORIS' (LoHa, LoKr, dora_scale, full).

The reader turns kohya's underscored, component-prefixed keys into the normalized
`LoraModule`s (`lora_unet_x_y.lora_down.weight` → module `x_y` of the unet, matched
against the base later by turning its dotted paths into underscores). Keys it does
not understand are kept in `unknown_keys`, so they are reported, never silently
dropped. The writer spells LoRA modules as sd-scripts does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError
from ..io.checkpoint import open_checkpoint
from .model import Adapter, LoraModule, ModuleFactors, read_scalar, safetensors_names

if TYPE_CHECKING:
    from ..io.spool import Spool

__all__ = ["KOHYA_PREFIXES", "KOHYA_PREFIX_FOR", "detect", "read", "kohya_name", "spool_module", "kohya_metadata"]

#: kohya name prefix → pipeline component (longest first: `lora_te1_` before `lora_te_`).
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
}
_KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "lokr_t2": "kt2", "dora_scale": "dora_scale", "diff": "diff", "diff_b": "diff_b",
}  # fmt: skip


def _split_kohya(key: str) -> tuple[str, str | None, str] | None:
    """`lora_unet_x_y.lora_down.weight` → (`x_y`, "unet", "down"); None for other keys."""
    name, _, suffix = key.partition(".")
    role = _KOHYA_ROLES.get(suffix)
    if role is None:
        return None
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return name[len(prefix) :], component, role
    return None


def _has_kohya_keys(names: list[str]) -> bool:
    return any(_split_kohya(n) is not None and _split_kohya(n)[2] != "alpha" for n in names)


def detect(path: Path) -> bool:
    return _has_kohya_keys(safetensors_names(path))


def _kohya_module(path: Path, weights, name: str, component: str, roles: dict[str, str], alpha_override):
    shapes = {role: weights.tensors[key].shape for role, key in roles.items()}
    if "diff" in roles or "diff_b" in roles:
        return _full_module(name, component, roles, shapes)
    if "down" in roles or "up" in roles:
        if not ("down" in roles and "up" in roles):
            missing = "lora_up.weight" if "down" in roles else "lora_down.weight"
            raise CorruptFileError(path, f"kohya module {name!r} has no {missing}")
        variant = "tucker" if "mid" in roles else "lora"
        rank = shapes["down"][0]
        kind = "conv" if len(shapes["down"]) > 2 else "linear"
        a_key, b_key = roles["down"], roles["up"]
    elif "w1a" in roles:
        needed = [r for r in ("w1a", "w1b", "w2a", "w2b") if r not in roles]
        if needed:
            raise CorruptFileError(path, f"LoHa module {name!r} lacks hada_{needed[0][:2]}_{needed[0][2]}")
        if ("t1" in roles) != ("t2" in roles):
            raise CorruptFileError(path, f"LoHa module {name!r} has one of hada_t1 / hada_t2 but not the other")
        variant, rank, a_key, b_key = "loha", shapes["w1b"][0], "", ""
        kind = "conv" if "t1" in roles or len(shapes["w1b"]) > 2 else "linear"
    elif any(r.startswith("k") for r in roles):
        if not ("k1" in roles or ("k1a" in roles and "k1b" in roles)) or not (
            "k2" in roles or ("k2a" in roles and "k2b" in roles)
        ):
            raise CorruptFileError(path, f"LoKr module {name!r} needs lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b)")
        variant, a_key, b_key = "lokr", "", ""
        # the rank as LyCORIS' forward pass reads it: lokr_w1_b's rows, else lokr_w2_b's (also under lokr_t2)
        rank = shapes["k1b"][0] if "k1b" in roles else shapes["k2b"][0] if "k2b" in roles else None
        kind = "conv" if len(shapes.get("k2", shapes.get("k2b", ()))) > 2 or "kt2" in roles else "linear"
    else:
        return None
    if alpha_override is not None:
        alpha = float(alpha_override)
    elif "alpha" in roles:
        alpha = read_scalar(weights, roles["alpha"])
    else:
        alpha = float(rank) if rank else 1.0
    # LyCORIS LoKr with both halves full applies no alpha/rank scale (its forward uses scale 1)
    scale = alpha / rank if rank else 1.0
    if rank is not None and not (math.isfinite(alpha) and alpha > 0):
        raise CorruptFileError(path, f"module {name!r} has alpha {alpha:g}; it must be a positive number")
    dora_axis = "out"
    if "dora_scale" in roles:
        dora_axis = "out" if shapes["dora_scale"][0] != 1 else "in"
    factors = tuple(
        sorted((role, key) for role, key in roles.items() if role not in ("down", "up", "alpha", "dora_scale"))
    )
    return LoraModule(
        name=name,
        kind=kind,
        a_key=a_key,
        b_key=b_key,
        a_shape=shapes.get("down", ()),
        b_shape=shapes.get("up", ()),
        rank=rank or 0,
        alpha=alpha,
        scale=scale,
        magnitude_key=roles.get("dora_scale"),
        variant=variant,
        factors=factors,
        dora_axis=dora_axis,
        component=component,
        kohya_name=True,
    )


def _full_module(name: str, component: str, roles: dict[str, str], shapes: dict):
    """LyCORIS "full" / ComfyUI difference keys: `.diff` is ΔW itself, `.diff_b` the bias' Δ (no scale)."""
    diff = shapes.get("diff", ())
    return LoraModule(
        name=name, kind="conv" if len(diff) > 2 else "linear", a_key="", b_key="", a_shape=(), b_shape=(), rank=0,
        alpha=1.0, scale=1.0, bias_key=roles.get("diff_b"), variant="full",
        factors=(("diff", roles["diff"]),) if "diff" in roles else (), component=component, kohya_name=True,
    )  # fmt: skip


def read(path: Path, *, alpha: float | None = None):
    weights = open_checkpoint(path)
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    unknown = []
    for key in weights.tensors:
        split = _split_kohya(key)
        if split is None:
            unknown.append(key)
            continue
        name, component, role = split
        grouped.setdefault((component, name), {})[role] = key
    modules = []
    for (component, name), roles in grouped.items():
        module = _kohya_module(path, weights, name, component, roles, alpha)
        if module is None:
            unknown.extend(roles.values())
        else:
            modules.append(module)
    modules.sort(key=lambda m: (m.component or "", m.name))
    metadata = weights.metadata
    fmt = "lycoris" if any(m.variant in ("loha", "lokr") for m in modules) else "kohya"
    return Adapter(
        path=path,
        format=fmt,
        modules=modules,
        replacements=[],
        unknown_keys=unknown,
        weights=weights,
        config={"ss_network_dim": metadata.get("ss_network_dim"), "ss_network_alpha": metadata.get("ss_network_alpha")},
        base_model=metadata.get("ss_sd_model_name") or metadata.get("modelspec.architecture"),
    )


# --- diffusers spellings ------------------------------------------------------------------------


# --- writing ------------------------------------------------------------------


#: pipeline component → the kohya prefix its modules are written under.
KOHYA_PREFIX_FOR = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te",
                     "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}  # fmt: skip


def kohya_metadata(source: Adapter, ranks: list[int]) -> dict[str, str]:
    """The file metadata sd-scripts writes (network module, dim), carrying the source's own metadata."""
    metadata = {k: v for k, v in source.metadata.items() if k != "format"}
    ranks = sorted(set(ranks))
    metadata.update(
        {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic"}
    )
    if source.base_model:
        metadata.setdefault("ss_sd_model_name", source.base_model)
    return metadata


def kohya_name(prefix: str, module: str) -> str:
    """A module's kohya name: its dotted path with underscores, after the component's prefix."""
    return f"{prefix}_{module.replace('.', '_')}"


def spool_module(spool: Spool, factors: ModuleFactors) -> None:
    """Spool one LoRA module under kohya's keys: down, up, alpha (fp32) and LyCORIS' per-output `dora_scale`."""
    import torch

    name = factors.name
    spool.add(f"{name}.lora_down.weight", factors.down)
    spool.add(f"{name}.lora_up.weight", factors.up)
    spool.add(f"{name}.alpha", torch.tensor(factors.alpha, dtype=torch.float32))
    if factors.magnitude is not None:
        spool.add(f"{name}.dora_scale", factors.magnitude.reshape(-1, 1))
