"""PEFT's other tuners written as plain LoRA (`convert --to peft`), so LoRA-only engines can serve them.

AdaLoRA and VeRA are rank-r LoRAs already: A' = A⊙E (AdaLoRA) or λ_d⊙A[:, :in] with
B' = λ_b⊙B[:out] (VeRA), copied with their scale as alpha, exact to fp32 rounding. Every
other tuner's change W' − W is formed (additive ones from their tensors; IA3, OFT, BOFT,
HRA and MiSS "bat" act on W, so they need the base) and replaced by its best rank-k
approximation (`--rank`), with the relative error (Eckart–Young) reported per module.
"""

from __future__ import annotations

import torch

from ..adapters.model import Adapter, LoraModule
from ..adapters.tuners import EXACT_LORA, TUNERS, tuner_of_variant
from ..errors import InvalidInputError, UnsupportedError
from ..io.checkpoint import Checkpoint
from ..lowrank.rank import RankRule
from ..lowrank.svd import factorize
from ..tuners import is_transform, tuner_change

__all__ = ["is_tuner", "tuner_factors"]


def is_tuner(module: LoraModule) -> bool:
    return tuner_of_variant(module.variant) is not None


def _peft_type(module: LoraModule) -> str:
    return next(t.peft_type for t in TUNERS.values() if t.variant == module.variant)


def _exact(module: LoraModule, read, weight_shape: tuple[int, ...] | None):
    """(A, B, alpha) of the rank-r LoRA that AdaLoRA and VeRA modules are, or None for other tuners."""
    if module.variant not in EXACT_LORA:
        return None
    roles = dict(module.factors)
    params = dict(module.params)
    if module.variant == "adalora":
        down, up = read(roles["A"]) * read(roles["E"]), read(roles["B"])
        scale = params["scaling"] / float(torch.tensor(params["ranknum"], dtype=torch.float32) + 1e-5)
        return down, up, scale * down.shape[0]
    if module.variant == "vera":
        if weight_shape is None:
            raise InvalidInputError(f"{module.name}: VeRA's shared projections are sliced to the layer; pass --base")
        inp = weight_shape[0] if module.fan_in_fan_out else weight_shape[1]
        lambda_b, lambda_d = read(roles["b"]), read(roles["d"])
        down = lambda_d[:, None] * read(roles["A"])[:, :inp]
        up = lambda_b[:, None] * read(roles["B"])[: lambda_b.shape[0]]
        return down, up, float(down.shape[0])
    return None


def tuner_factors(adapter: Adapter, module: LoraModule, base: Checkpoint | None, path: str, rule: RankRule | None):
    """(A, B, alpha, rank, relative error, method) of a PEFT LoRA that serves this tuner module.

    Raises:
        InvalidInputError: a re-factorised module without `rank`, or one that needs the base without it.
        UnsupportedError: IA3 that also scales a bias (LoRA has no way to carry it).
    """
    weight = base.read(f"{path}.weight").double() if base is not None else None
    shape = tuple(weight.shape) if weight is not None else None

    def read(key: str) -> torch.Tensor:
        return adapter.read(key).double()

    exact = _exact(module, read, shape)
    if exact is not None:
        down, up, alpha = exact
        return down.float(), up.float(), alpha, down.shape[0], 0.0, "copied (exact)"
    if module.variant == "ia3" and base is not None and f"{path}.bias" in base.tensors and module.bias_key:
        raise UnsupportedError(f"{module.name}: IA3 scales {path}.bias too, which a LoRA cannot carry")
    if rule is None:
        needs = " and --base" if is_transform(module) and base is None else ""
        raise InvalidInputError(
            f"{module.name} is {_peft_type(module)}: pass --rank N (or --energy F){needs} to write the best "
            "rank-N LoRA of its change"
        )
    shapes = {role: adapter.tensors[key].shape for role, key in module.factors}
    delta = tuner_change(module, read, weight, shapes)
    transposed = module.fan_in_fan_out or module.kind == "embedding"  # PEFT's LoRA keeps these as (B·A)ᵀ
    matrix = delta.T if transposed else delta.reshape(delta.shape[0], -1)
    b, a, method = factorize(matrix, rule, "auto")
    error = float((matrix - b @ a).norm() / matrix.norm()) if matrix.norm() > 0 else 0.0
    kept = a.shape[0]
    if not transposed and delta.dim() > 2:  # conv: A as r×in×kh×kw, B as out×r×1×1
        a, b = a.reshape(kept, *delta.shape[1:]), b.reshape(delta.shape[0], kept, *([1] * (delta.dim() - 2)))
    return a.float(), b.float(), float(kept), kept, error, f"re-factorised ({method})"
