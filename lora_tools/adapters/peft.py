"""PEFT adapters: folders (`adapter_config.json` + weights) and lone files, read and written.

Reading groups PEFT-keyed tensors into `LoraModule`s and `Replacement`s, scaled as
PEFT scales them (alpha/r, or alpha/√r for rsLoRA, with rank and alpha patterns).
Writing spells modules in PEFT's keys and writes a config PEFT loads, for every
command that writes a PEFT folder (extract, resize, combine, convert); `as_peft`
sees an adapter of a serving format (GGUF, mlx-lm) as a PEFT one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError, UnsupportedError
from ..io.checkpoint import Checkpoint, open_checkpoint, read_json
from ..io.derived import DerivedCheckpoint
from ..layouts.vocab import is_saved_embedding
from .inits import check_init_field, with_base_init
from .model import MAX_ALPHA, MAX_RANK, Adapter, LoraModule, ModuleFactors, Replacement, safetensors_names
from .peft_rules import (
    LEGACY_KEY_SUFFIXES,
    MERGED_LINEAR_REASON,
    WRAPPER_COPY,
    alpha_is_rank,
    implicit_modules_to_save,
    merged_linear_modules,
    metadata_config,
    pattern_key,
    saved_tensor,
    target_module_matches,
)
from .tuners import build_tuner_adapter, check_tuner_config

if TYPE_CHECKING:
    from ..io.spool import Spool

__all__ = [
    "PEFT_PREFIX",
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "pattern_key",
    "build_peft_adapter",
    "detect_folder",
    "read_folder",
    "detect_file",
    "read_file",
    "lora_keys",
    "magnitude_key",
    "spool_module",
    "peft_adapter_config",
    "write_adapter_config",
    "as_peft",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: Formats read from files PEFT cannot load, which `as_peft` re-keys as PEFT.
CONVERTED_FORMATS = ("gguf", "mlx")

# --- PEFT -----------------------------------------------------------------

PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    **LEGACY_KEY_SUFFIXES,
    ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_layer",
    ".token_adapter.trainable_tokens_delta": "tokens",
}


def _split_peft_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.x.q_proj.lora_A.weight` → (`x.q_proj`, "A"); None for other keys."""
    for suffix, role in _PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(PEFT_PREFIX), role
    return None


def _peft_weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_NAME, "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise InvalidInputError(f"{folder}: has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def _check_peft_config(path: Path, config: dict) -> None:
    """Reject configs whose values PEFT would misread or that make no sense, naming the field."""
    if config.get("peft_type", "LORA") != "LORA":
        check_tuner_config(path, config)  # the other tuners: their own rows (`tuners.TUNERS`)
        return

    def bad(field_name: str, why: str) -> CorruptFileError:
        return CorruptFileError(path, f"adapter_config.json field {field_name!r} {why}")

    rank = config.get("r", 8)
    if type(rank) is not int or not 0 < rank <= MAX_RANK:
        raise bad("r", f"must be an integer in 1..{MAX_RANK}, found {rank!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= MAX_ALPHA:
        raise bad("lora_alpha", f"must be a number in (0, {MAX_ALPHA:g}], found {alpha!r}")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(flag, False), bool):
            raise bad(flag, f"must be true or false, found {config[flag]!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise bad(name, f"must be an object, found {type(patterns).__name__}")
        for key, value in patterns.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise bad(name, f"key {key!r} is not a valid regular expression ({exc})") from exc
            limit = MAX_RANK if name == "rank_pattern" else MAX_ALPHA
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
                raise bad(name, f"value for {key!r} must be a number in (0, {limit:g}], found {value!r}")
    for name in ("modules_to_save", "target_modules"):
        value = config.get(name)
        if value is not None and not isinstance(value, str | list):
            raise bad(name, f"must be a list of names, found {type(value).__name__}")
    tokens = config.get("trainable_token_indices")
    if tokens is not None and not isinstance(tokens, list | dict):
        raise bad("trainable_token_indices", f"must be a list or an object, found {type(tokens).__name__}")
    init_problem = check_init_field(config)
    if init_problem is not None:
        raise bad("init_lora_weights", init_problem)


def _token_indices(config: dict, module: str) -> tuple[int, ...] | None:
    spec = config.get("trainable_token_indices")
    if isinstance(spec, list):
        return tuple(spec)
    if isinstance(spec, dict):
        for key, indices in spec.items():
            if module == key or module.endswith(f".{key}"):
                return tuple(indices)
    return None


def build_peft_adapter(path: Path, weights: Checkpoint, config: dict, format_name: str = "peft") -> Adapter:
    """Group PEFT-keyed tensors into modules and replacements, scaled as PEFT scales them."""
    grouped: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    replacements: list[Replacement] = []
    to_save = implicit_modules_to_save(config)  # PEFT's rules (peft_rules): task heads, suffixes, sub-modules
    for key in weights.tensors:
        split = _split_peft_key(key)
        if split is not None:
            module, role = split
            grouped.setdefault(module, {})[role] = key
            continue
        stripped = key.removeprefix(PEFT_PREFIX)
        saved = saved_tensor(stripped, config, to_save)
        if saved == WRAPPER_COPY:
            continue  # copies of a modules_to_save module saved beside it (resized vocabulary, bias: all)
        if saved is not None:
            replacements.append(Replacement(saved[0], key, origin=saved[1]))
        elif is_saved_embedding(stripped):
            replacements.append(Replacement(stripped, key, origin="saved embedding"))
        else:
            unknown.append(key)

    _refuse_merged_linear(path, weights, grouped)
    use_rslora = bool(config.get("use_rslora", False))
    alpha_default = config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: list[LoraModule] = []
    for module, roles in grouped.items():
        if "base_layer" in roles:
            replacements.append(Replacement(f"{module}.weight", roles["base_layer"], origin="saved base layer"))
        if "tokens" in roles:
            rows = _token_indices(config, module)
            if rows is None:
                raise CorruptFileError(
                    path, f"{roles['tokens']} has trainable tokens but trainable_token_indices names no rows for it"
                )
            replacements.append(Replacement(f"{module}.weight", roles["tokens"], rows, origin="trainable tokens"))
        pair = ("embA", "embB") if "embA" in roles or "embB" in roles else ("A", "B")
        present = [r for r in pair if r in roles]
        if not present:
            unknown.extend(roles[r] for r in ("bias", "magnitude") if r in roles)
            continue
        if len(present) == 1:
            missing = {
                "A": "lora_A.weight",
                "B": "lora_B.weight",
                "embA": "lora_embedding_A",
                "embB": "lora_embedding_B",
            }
            other = next(r for r in pair if r not in roles)
            raise CorruptFileError(path, f"module {module!r} has {roles[present[0]]} but no {missing[other]}")
        a_info, b_info = weights.tensors[roles[pair[0]]], weights.tensors[roles[pair[1]]]
        kind = "embedding" if pair[0] == "embA" else ("conv" if len(a_info.shape) > 2 else "linear")
        rank = a_info.shape[0] if a_info.shape else 0
        alpha_key = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[alpha_key] if alpha_key is not None else alpha_default)
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank if rank else 0.0
        modules.append(
            LoraModule(
                name=module,
                kind=kind,
                a_key=roles[pair[0]],
                b_key=roles[pair[1]],
                a_shape=a_info.shape,
                b_shape=b_info.shape,
                rank=rank,
                alpha=alpha,
                scale=scale,
                fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and kind == "linear",
                magnitude_key=roles.get("magnitude"),
                bias_key=roles.get("bias"),
            )
        )
    modules.sort(key=lambda m: _natural_key(m.name))
    modules = with_base_init(config, modules)  # PiSSA/OLoRA: the merge recomputes the residual base
    return Adapter(
        path=path,
        format=format_name,
        modules=modules,
        replacements=replacements,
        unknown_keys=unknown,
        weights=weights,
        config=config,
        base_model=config.get("base_model_name_or_path") or None,
        use_rslora=use_rslora,
    )


def _refuse_merged_linear(path: Path, weights: Checkpoint, grouped: dict[str, dict[str, str]]) -> None:
    """PEFT 0.2's MergedLinear factors read as plain LoRA would give a wrong rank and scale: refuse, naming them."""
    shapes = {
        module: (weights.tensors[roles["A"]].shape, weights.tensors[roles["B"]].shape)
        for module, roles in grouped.items()
        if "A" in roles and "B" in roles
    }
    found = merged_linear_modules(shapes)
    if found:
        a, b = shapes[found[0]]
        raise UnsupportedError(
            f"{path}: {found[0]} (lora_A {list(a)}, lora_B {list(b)}"
            f"{f' and {len(found) - 1} more' if len(found) > 1 else ''}) is {MERGED_LINEAR_REASON}"
        )


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def detect_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_folder(path: Path, *, alpha: float | None = None) -> Adapter:
    config = read_json(path / CONFIG_NAME, CONFIG_NAME)
    _check_peft_config(path / CONFIG_NAME, config)
    if config.get("peft_type", "LORA") != "LORA":
        return build_tuner_adapter(path, open_checkpoint(_peft_weights_file(path)), config)
    if alpha is not None:
        config = {**config, "lora_alpha": alpha, "alpha_pattern": {}}
    adapter = build_peft_adapter(path, open_checkpoint(_peft_weights_file(path)), config)
    _refuse_contradicted_ranks(path / CONFIG_NAME, adapter)
    return adapter


def _refuse_contradicted_ranks(path: Path, adapter: Adapter) -> None:
    """A factor rank the config's `r` / `rank_pattern` contradicts: PEFT cannot load it (size mismatch), and
    its scale is ambiguous (PEFT scales by the configured rank), so it is refused rather than guessed."""
    patterns = adapter.config.get("rank_pattern") or {}
    by_parameter = bool(adapter.config.get("target_parameters"))  # ParamWrapper: lora_A holds r rows per expert
    wrong = []
    for module in adapter.modules:
        if by_parameter and not target_module_matches(adapter.config.get("target_modules"), module.name):
            continue
        key = pattern_key(patterns, module.name)
        configured = patterns[key] if key is not None else adapter.config.get("r", 8)
        if module.rank != configured:
            wrong.append(f"{module.name} (factors rank {module.rank}, config {configured})")
    if wrong:
        more = f" and {len(wrong) - 1} more" if len(wrong) > 1 else ""
        raise CorruptFileError(
            path, f"r / rank_pattern contradict the factors: {wrong[0]}{more}; PEFT cannot load this adapter either"
        )


def _has_peft_keys(names: list[str]) -> bool:
    return any(_split_peft_key(n) is not None and _split_peft_key(n)[1] in ("A", "embA") for n in names)


def detect_file(path: Path) -> bool:
    return _has_peft_keys(safetensors_names(path))


def read_file(path: Path, *, alpha: float | None = None) -> Adapter:
    """A lone PEFT-keyed file: alpha from --alpha, diffusers' `lora_adapter_metadata`, a `lora_alpha` metadata
    entry, or — for keys PEFT did not write (no `base_model.model.`: diffusers, ComfyUI, ai-toolkit) — diffusers'
    own rule, alpha = rank (scale 1). A PEFT file with none of these is refused: PEFT has no such default."""
    weights = open_checkpoint(path)
    ranks = {
        key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX): info.shape[0]
        for key, info in weights.tensors.items()
        if key.endswith(".lora_A.weight") and info.shape
    }
    config = {"peft_type": "LORA", "r": min(ranks.values()) if ranks else 8}
    recorded = metadata_config(weights.metadata, None)
    if alpha is None and recorded is not None:
        config = {**config, **recorded}
        _check_peft_config(path, config)
    elif alpha is None and (found := weights.metadata.get("lora_alpha") or weights.metadata.get("alpha")) is not None:
        try:
            config["lora_alpha"] = float(found)
        except ValueError as exc:
            raise CorruptFileError(path, f"metadata lora_alpha {found!r} is not a number") from exc
    elif alpha is None and not all(key.startswith(PEFT_PREFIX) for key in weights.tensors):
        config.update(alpha_is_rank(ranks))
    elif alpha is None:
        raise InvalidInputError(
            f"{path}: a lone PEFT adapter file does not say its lora_alpha; pass --alpha "
            "(or use the PEFT folder with its adapter_config.json)"
        )
    else:
        config["lora_alpha"] = alpha
    if not 0 < config["lora_alpha"] <= MAX_ALPHA:
        raise InvalidInputError(f"{path}: alpha must be in (0, {MAX_ALPHA:g}], got {config['lora_alpha']:g}")
    return build_peft_adapter(path, weights, config, format_name="peft-safetensors")


# --- writing ----------------------------------------------------------------


def peft_adapter_config(
    ranks: dict[str, int],
    alphas: dict[str, float],
    *,
    base_model: str | None,
    fan_in_fan_out: bool,
    modules_to_save: list[str],
    use_rslora: bool = False,
    extra: dict | None = None,
) -> dict:
    """An adapter_config.json PEFT loads: the most common rank/alpha as defaults, the rest as patterns."""
    common_rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    common_alpha = Counter(a for m, a in alphas.items() if ranks[m] == common_rank).most_common(1)[0][0] if ranks else 8
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": common_rank,
        "lora_alpha": common_alpha,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: r for m, r in sorted(ranks.items()) if r != common_rank},
        "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != common_alpha},
        "modules_to_save": sorted(modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": use_rslora,
        "use_dora": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    config.update(extra or {})
    return config


def write_adapter_config(folder: Path, config: dict) -> None:
    """`adapter_config.json`, keys sorted, as every loratool PEFT output writes it."""
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def lora_keys(module: str, kind: str) -> tuple[str, str]:
    """The PEFT keys of a module's A and B (`lora_embedding_A`/`_B` for an embedding)."""
    prefix = f"{PEFT_PREFIX}{module}"
    if kind == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def magnitude_key(module: str) -> str:
    """The PEFT key of a module's DoRA magnitude vector."""
    return f"{PEFT_PREFIX}{module}.lora_magnitude_vector"


def spool_module(spool: Spool, factors: ModuleFactors) -> None:
    """Spool one module's A, B and DoRA magnitude under PEFT's keys for its layer kind.

    PEFT keeps alpha out of the tensors: `peft_adapter_config` records it (`lora_alpha`, `alpha_pattern`).
    """
    key_a, key_b = lora_keys(factors.name, factors.kind)
    spool.add(key_a, factors.down)
    spool.add(key_b, factors.up)
    if factors.magnitude is not None:
        spool.add(magnitude_key(factors.name), factors.magnitude.reshape(-1))


def as_peft(adapter: Adapter) -> Adapter:
    """A GGUF or mlx-lm adapter seen as a PEFT one: PEFT keys and config, same factors and scales.

    Lets code that writes PEFT folders by the source's own keys (resize) take these formats.
    """
    if adapter.format not in CONVERTED_FORMATS:
        return adapter
    entries, modules = {}, []
    for module in adapter.modules:
        keys = lora_keys(module.name, module.kind)
        magnitude = magnitude_key(module.name) if module.magnitude_key else None
        for new, old in zip((*keys, magnitude), (module.a_key, module.b_key, module.magnitude_key), strict=True):
            if new is not None:
                info = adapter.tensors[old]
                entries[new] = (info.dtype, info.shape, lambda old=old: adapter.read(old))
        modules.append(replace(module, a_key=keys[0], b_key=keys[1], magnitude_key=magnitude))
    ranks = {m.name: m.rank for m in modules}
    config = peft_adapter_config(
        ranks, {m.name: m.scale * m.rank for m in modules}, base_model=adapter.base_model, fan_in_fan_out=False,
        modules_to_save=[], extra={"use_dora": any(m.dora for m in modules)},
    )  # fmt: skip
    weights = DerivedCheckpoint.build(adapter.path, adapter.weights.files[0], entries, dict(adapter.metadata))
    return Adapter(adapter.path, "peft", modules, [], list(adapter.unknown_keys), weights, config, adapter.base_model)
