"""The normalized adapter model every format is read into: modules, replacements, tensors read one at a time.

A reader turns a format's key spellings and config into `LoraModule`s (one per
adapted base module) and `Replacement`s (tensors that overwrite base tensors or
rows of them). Everything downstream — validation, planning, merging — sees only
this model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_header import TensorInfo, read_header

if TYPE_CHECKING:
    import torch

__all__ = [
    "LoraModule",
    "ModuleFactors",
    "Replacement",
    "Adapter",
    "MAX_RANK",
    "MAX_ALPHA",
    "safetensors_names",
    "read_scalar",
]

#: Largest rank and alpha a config may give: beyond them a value is a typo or a hostile file.
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
        base_init: for a PiSSA or OLoRA module, the init ("pissa", "olora") whose residual
            W − s·B₀A₀ replaces the base weight before ΔW is added (see `adapters.inits`).
        params: a PEFT tuner's per-module settings (`adapters.tuners`), as sorted (name, value) pairs.
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
    base_init: str | None = None
    params: tuple[tuple[str, object], ...] = ()

    @property
    def dora(self) -> bool:
        return self.magnitude_key is not None

    def factor(self, role: str) -> str | None:
        return dict(self.factors).get(role)

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass(frozen=True)
class ModuleFactors:
    """One LoRA module's factors as an adapter format writes them (`AdapterFormat.write_module`).

    `name` is the module's key in the target format's spelling (a dotted path for PEFT and
    diffusers, a kohya name for kohya); `down` is A (r × in …), `up` is B (out × r …), the
    module's scale is `alpha / r`; `magnitude` is DoRA's per-output magnitude, if any; `kind`
    is the layer kind PEFT spells its keys by (embeddings differ).
    """

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    kind: str = "linear"


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


def safetensors_names(path: Path) -> list[str]:
    """Tensor names of a readable `.safetensors` file, or [] for anything else (format detection)."""
    if not path.is_file() or path.suffix != ".safetensors":
        return []
    try:
        return list(read_header(path)[0])
    except CorruptFileError:
        return []


def read_scalar(weights, key: str) -> float:
    """A one-number tensor of an adapter file (an alpha) as a float, or `CorruptFileError` naming it."""
    value = weights.read(key)
    if value.numel() != 1:
        raise CorruptFileError(weights.path, f"{key} should hold one number, found shape {list(value.shape)}")
    return float(value.reshape(-1)[0])
