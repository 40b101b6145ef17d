"""Adapter formats beyond PEFT: kohya / sd-scripts (LoRA, LoCon, Tucker), LyCORIS (LoHa, LoKr,
dora_scale), and diffusers spellings with component prefixes.

Each reader turns its key spellings into the normalized `LoraModule`s of
`reading.py`; `register` plugs them into the format registry. Keys a reader
does not understand are kept in `unknown_keys`, so they are reported, never
silently dropped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..errors import CorruptFileError, InvalidInputError
from ..io.checkpoint import open_checkpoint

__all__ = ["register", "KOHYA_PREFIXES", "COMPONENT_PREFIXES"]

#: kohya name prefix → pipeline component (longest first: `lora_te1_` before `lora_te_`).
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_transformer_": "transformer",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
}
#: diffusers key prefix → pipeline component.
COMPONENT_PREFIXES = {
    "unet.": "unet",
    "transformer.": "transformer",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
    "text_encoder_3.": "text_encoder_3",
    "vae.": "vae",
}
_KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k1", "lokr_w1_a": "k1a", "lokr_w1_b": "k1b", "lokr_w2": "k2", "lokr_w2_a": "k2a", "lokr_w2_b": "k2b",
    "lokr_t2": "kt2", "dora_scale": "dora_scale", "diff": "diff", "diff_b": "diff_b",
}  # fmt: skip
_DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".alpha", "alpha"),
)  # fmt: skip


def _scalar(weights, key: str) -> float:
    value = weights.read(key)
    if value.numel() != 1:
        raise CorruptFileError(weights.path, f"{key} should hold one number, found shape {list(value.shape)}")
    return float(value.reshape(-1)[0])


# --- kohya / LyCORIS -----------------------------------------------------------------------


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


def _detect_kohya(path: Path) -> bool:
    from .reading import safetensors_names

    return _has_kohya_keys(safetensors_names(path))


def _kohya_module(path: Path, weights, name: str, component: str, roles: dict[str, str], alpha_override):
    from .reading import LoraModule

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
        alpha = _scalar(weights, roles["alpha"])
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
    from .reading import LoraModule

    diff = shapes.get("diff", ())
    return LoraModule(
        name=name, kind="conv" if len(diff) > 2 else "linear", a_key="", b_key="", a_shape=(), b_shape=(), rank=0,
        alpha=1.0, scale=1.0, bias_key=roles.get("diff_b"), variant="full",
        factors=(("diff", roles["diff"]),) if "diff" in roles else (), component=component, kohya_name=True,
    )  # fmt: skip


def _read_kohya(path: Path, *, alpha: float | None = None):
    from .reading import Adapter

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


def _detect_diffusers(path: Path) -> bool:
    from .reading import safetensors_names

    names = safetensors_names(path)
    splits = [_split_diffusers(n) for n in names]
    has_old = any(".lora.down." in n or "lora_linear_layer" in n or "_lora.down." in n for n in names)
    has_component = any(s is not None and s[1] is not None for s in splits)
    return any(s is not None and s[2] == "down" for s in splits) and (has_old or has_component)


def _read_diffusers(path: Path, *, alpha: float | None = None):
    from .reading import Adapter, LoraModule

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
        module_alpha = alpha if alpha is not None else _scalar(weights, roles["alpha"]) if "alpha" in roles else rank
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


def register(formats: list) -> None:
    """Add the kohya / LyCORIS and diffusers readers to the registry (diffusers before lone PEFT files)."""
    from .reading import AdapterFormat

    formats.insert(1, AdapterFormat("diffusers", _detect_diffusers, _read_diffusers))
    formats.append(AdapterFormat("kohya", _detect_kohya, _read_kohya))
