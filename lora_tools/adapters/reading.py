"""Adapters of every supported format, read into one normalized model.

A reader turns a format's key spellings and config into `LoraModule`s (one per
adapted base module) and `Replacement`s (tensors that overwrite base tensors or
rows of them). Everything downstream — validation, planning, merging — sees
only this model. New formats register a detector and a reader in `FORMATS`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError, UnknownFormatError
from ..io.checkpoint import PICKLE_SUFFIXES, Checkpoint, open_checkpoint, read_json
from ..io.safetensors_io import TensorInfo, read_header
from ..layouts.vocab import is_saved_embedding, is_wrapper_copy

if TYPE_CHECKING:
    import torch

__all__ = ["LoraModule", "Replacement", "Adapter", "AdapterFormat", "FORMATS", "read_adapter", "is_adapter"]

MAX_RANK = 1 << 16
MAX_ALPHA = 1e6


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scale · B·A, laid out like the base weight.

    Attributes:
        name: the module path in the base model, e.g. `model.layers.0.self_attn.q_proj`.
        kind: "linear", "conv" or "embedding".
        a_key, b_key: adapter tensor names of A (r×in…) and B (out×r…).
        rank, alpha, scale: as PEFT computes them (scale = alpha/r, or alpha/√r for rsLoRA).
        fan_in_fan_out: the base weight is stored in×out (GPT-2 Conv1D).
        magnitude_key: DoRA magnitude (PEFT) or `dora_scale` (LyCORIS), if any.
        bias_key: `lora_B.bias`, added to the base bias times scale, if any.
        variant: "lora" (B·A), "tucker" (up·mid·down), "loha" ((w1a·w1b)⊙(w2a·w2b)) or
            "lokr" (w1 ⊗ w2); the last three keep their tensors in `factors`.
        factors: role → adapter tensor name, for the variants.
        dora_axis: "out" when the DoRA norm is taken per output channel (PEFT), "in" per
            input channel (LyCORIS' default).
        component: the pipeline component the module belongs to ("unet", "text_encoder", …).
        kohya_name: True when `name` is a kohya-style underscored path, matched against the base by
            turning the base's own dotted paths into underscores.
    """

    name: str
    kind: str
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    fan_in_fan_out: bool = False
    magnitude_key: str | None = None
    bias_key: str | None = None
    variant: str = "lora"
    factors: tuple[tuple[str, str], ...] = ()
    dora_axis: str = "out"
    component: str | None = None
    kohya_name: bool = False

    @property
    def dora(self) -> bool:
        return self.magnitude_key is not None

    def factor(self, role: str) -> str | None:
        return dict(self.factors).get(role)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass(frozen=True)
class Replacement:
    """A base tensor (or some of its rows) overwritten by an adapter tensor.

    `rows` is None for a whole tensor (modules_to_save, saved embedding base
    layers) and the row indices for trainable tokens.
    """

    target: str
    key: str
    rows: tuple[int, ...] | None = None
    origin: str = "modules_to_save"
    component: str | None = None


@dataclass
class Adapter:
    """An adapter in normalized form, tensors readable one at a time."""

    path: Path
    format: str
    modules: list[LoraModule]
    replacements: list[Replacement]
    unknown_keys: list[str]
    weights: Checkpoint
    config: dict = field(default_factory=dict)
    base_model: str | None = None
    use_rslora: bool = False

    @property
    def components(self) -> set[str | None]:
        return {m.component for m in self.modules} | {r.component for r in self.replacements}

    def restricted(self, *components: str | None) -> Adapter:
        """The part of the adapter that targets these pipeline components (unknown keys stay with the whole)."""
        return replace(
            self,
            modules=[m for m in self.modules if m.component in components],
            replacements=[r for r in self.replacements if r.component in components],
            unknown_keys=[],
        )

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.weights.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.weights.metadata

    @property
    def num_parameters(self) -> int:
        return self.weights.num_parameters

    def read(self, key: str) -> torch.Tensor:
        return self.weights.read(key)


@dataclass(frozen=True)
class AdapterFormat:
    """A registered adapter format: `detect(path)` says whether `read` applies."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., Adapter]


# --- PEFT -----------------------------------------------------------------

_PEFT_PREFIX = "base_model.model."
_PEFT_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embA",
    ".lora_embedding_B": "embB",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_layer",
    ".token_adapter.trainable_tokens_delta": "tokens",
}


def _split_peft_key(key: str) -> tuple[str, str] | None:
    """`base_model.model.x.q_proj.lora_A.weight` → (`x.q_proj`, "A"); None for other keys."""
    for suffix, role in _PEFT_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(_PEFT_PREFIX), role
    return None


def pattern_key(patterns: dict, module: str) -> str | None:
    """The first key of a PEFT rank/alpha pattern that matches `module` (PEFT's rule: regex anchored at a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _module_matches(names: list[str], module: str) -> bool:
    """PEFT's modules_to_save rule: a name matches the module path or a dotted suffix of it."""
    return any(module == n or module.endswith(f".{n}") for n in names)


def _peft_weights_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise InvalidInputError(f"{folder}: has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def _check_peft_config(path: Path, config: dict) -> None:
    """Reject configs whose values PEFT would misread or that make no sense, naming the field."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnknownFormatError(f"{path}: peft_type {peft_type!r} is not supported (only LORA)")

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
    to_save = config.get("modules_to_save") or []
    to_save = [to_save] if isinstance(to_save, str) else to_save
    for key in weights.tensors:
        split = _split_peft_key(key)
        if split is not None:
            module, role = split
            grouped.setdefault(module, {})[role] = key
            continue
        stripped = key.removeprefix(_PEFT_PREFIX)
        module = stripped.rsplit(".", 1)[0]
        if _module_matches(to_save, module):
            replacements.append(Replacement(stripped, key))
        elif is_wrapper_copy(module, to_save):
            continue  # copies of a modules_to_save module saved beside it (resized vocabulary)
        elif is_saved_embedding(stripped):
            replacements.append(Replacement(stripped, key, origin="saved embedding"))
        else:
            unknown.append(key)

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


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _detect_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _read_peft_folder(path: Path, *, alpha: float | None = None) -> Adapter:
    config = read_json(path / "adapter_config.json", "adapter_config.json")
    _check_peft_config(path / "adapter_config.json", config)
    if alpha is not None:
        config = {**config, "lora_alpha": alpha, "alpha_pattern": {}}
    return build_peft_adapter(path, open_checkpoint(_peft_weights_file(path)), config)


def _has_peft_keys(names: list[str]) -> bool:
    return any(_split_peft_key(n) is not None and _split_peft_key(n)[1] in ("A", "embA") for n in names)


def safetensors_names(path: Path) -> list[str]:
    """Tensor names of a readable `.safetensors` file, or [] for anything else (format detection)."""
    if not path.is_file() or path.suffix != ".safetensors":
        return []
    try:
        return list(read_header(path)[0])
    except CorruptFileError:
        return []


def _detect_peft_file(path: Path) -> bool:
    return _has_peft_keys(safetensors_names(path))


def _read_peft_file(path: Path, *, alpha: float | None = None) -> Adapter:
    weights = open_checkpoint(path)
    if alpha is None:
        found = weights.metadata.get("lora_alpha") or weights.metadata.get("alpha")
        if found is None:
            raise InvalidInputError(
                f"{path}: a lone adapter file does not say its lora_alpha; pass --alpha "
                "(or use the PEFT folder with its adapter_config.json)"
            )
        try:
            alpha = float(found)
        except ValueError as exc:
            raise CorruptFileError(path, f"metadata lora_alpha {found!r} is not a number") from exc
    if not 0 < alpha <= MAX_ALPHA:
        raise InvalidInputError(f"{path}: alpha must be in (0, {MAX_ALPHA:g}], got {alpha:g}")
    ranks = {info.shape[0] for key, info in weights.tensors.items() if key.endswith(".lora_A.weight") and info.shape}
    config = {"peft_type": "LORA", "lora_alpha": alpha, "r": min(ranks) if ranks else 8}
    return build_peft_adapter(path, weights, config, format_name="peft-safetensors")


FORMATS: list[AdapterFormat] = [
    AdapterFormat("peft", _detect_peft_folder, _read_peft_folder),
    AdapterFormat("peft-safetensors", _detect_peft_file, _read_peft_file),
]

from .formats import register  # noqa: E402  (the other formats plug in after the PEFT ones)

register(FORMATS)

from ..serving import register as register_serving  # noqa: E402  (GGUF and mlx-lm readers)

register_serving(FORMATS)


def is_adapter(path: str | os.PathLike) -> bool:
    """True when some registered format recognises `path`."""
    return any(fmt.detect(Path(path)) for fmt in FORMATS)


def read_adapter(path: str | os.PathLike, *, alpha: float | None = None) -> Adapter:
    """Read an adapter in any registered format.

    Args:
        path: a PEFT folder or an adapter file.
        alpha: overrides lora_alpha (needed for lone files that do not record it).

    Raises:
        UnknownFormatError: no registered format recognises `path`.
        CorruptFileError: the adapter is malformed, naming the file and key.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt.read(path, alpha=alpha)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise UnknownFormatError(f"{path}: a lone pickle is not a known adapter format; pass the PEFT folder")
    raise UnknownFormatError(
        f"{path}: not a known adapter format (expected a PEFT folder with adapter_config.json, "
        "or a .safetensors file with lora_A/lora_B keys)"
    )
