"""PEFT's tuners other than LoRA, as data: one `Tuner` row per `peft_type`.

Each row follows PEFT's own split (`peft/tuners/<name>/config.py`, `layer.py`): the
config fields that change the merge, with PEFT's defaults (so a config saved by an
older PEFT, without the newer fields, reads as PEFT reads it), the key suffixes of a
module's tensors and the model-level tensors its modules share (VeRA's `vera_A`), the
layer kinds PEFT supports for it, whether its merge adds ΔW or transforms W, how it
un-merges, and the per-module numbers the arithmetic needs (`LoraModule.params`).

Reading groups a PEFT folder's tensors into one `LoraModule` per adapted module, its
`variant` naming the arithmetic (`lora_tools.tuners` computes it); LoHa and LoKr are
read into the LyCORIS variants `loha` and `lokr`, with PEFT's key names and scale.
Nothing here reads tensor data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorruptFileError, InvalidInputError, UnknownFormatError, UnsupportedError
from ..io.checkpoint import Checkpoint
from .model import Adapter, LoraModule, Replacement
from .peft_rules import WRAPPER_COPY, implicit_modules_to_save, saved_tensor

__all__ = [
    "Tuner",
    "TUNERS",
    "tuner_for",
    "tuner_of_variant",
    "check_tuner_config",
    "build_tuner_adapter",
    "tuner_problems",
    "MULTIPLICATIVE",
    "transforms_weight",
    "tuner_delta_shape",
    "EXACT_LORA",
    "support_table",
    "refuse_tuner",
    "needs_lora_first",
]

_PREFIX = "base_model.model."
_SHARED_PREFIX = "base_model."


@dataclass(frozen=True)
class Tuner:
    """One PEFT tuner: how its files read and what its merge is.

    Attributes:
        peft_type: the config's `peft_type`.
        variant: `LoraModule.variant` of its modules (the arithmetic's name).
        roles: a module's key suffix → role (`.lora_A` → "A").
        required: the roles every module must have.
        shared: model-level keys (`base_model.vera_A`) → role, shared by every module.
        defaults: the config fields that change the merge, with PEFT 0.21's defaults.
        layers: the layer kinds PEFT supports for it.
        merge: "additive" (W + ΔW) or "multiplicative" (W transformed).
        unmerge: how W comes back (None: it does not).
        params: (config with defaults, module name, role → shape) → the module's parameters.
        problems: (params, role → shape, base weight shape) → what does not fit, or "".
    """

    peft_type: str
    variant: str
    roles: Mapping[str, str]
    required: tuple[str, ...]
    defaults: Mapping[str, object]
    layers: tuple[str, ...]
    merge: str
    unmerge: str | None
    params: Callable[[dict, str, dict], dict]
    problems: Callable[[dict, dict, tuple[int, ...]], str]
    shared: Mapping[str, str] = field(default_factory=dict)


def _pattern(patterns: Mapping, module: str, default):
    """PEFT's rank/alpha pattern rule: the first key whose regex matches the module path at a dot."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _two_d(weight: tuple[int, ...], transposed: bool = False) -> tuple[int, int]:
    """(out, in) of a base weight's 2-D view (a conv's in is in·kh·kw; Conv1D stores in×out)."""
    if transposed and len(weight) == 2:
        return weight[1], weight[0]
    return weight[0], math.prod(weight[1:])


def _expect(found: dict, wanted: dict) -> str:
    """'' when every role has the shape wanted, else the mismatches."""
    bad = [f"{role} {list(found[role])} (expected {list(shape)})" for role, shape in wanted.items()
           if role in found and tuple(found[role]) != tuple(shape)]  # fmt: skip
    return ", ".join(bad)


# --- per-tuner parameters and shape checks --------------------------------------


def _adalora_params(config: dict, module: str, shapes: dict) -> dict:
    rank = shapes["A"][0]
    alpha = config["lora_alpha"]
    return {"scaling": float(alpha if alpha > 0 else rank), "ranknum": float(config["init_r"]),
            "fan_in_fan_out": bool(config["fan_in_fan_out"])}  # fmt: skip


def _adalora_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = _two_d(weight, params["fan_in_fan_out"])
    rank = shapes["A"][0]
    return _expect(shapes, {"A": (rank, inp), "B": (out, rank), "E": (rank, 1)})


def _ia3_feedforward(config: dict, module: str) -> bool:
    names = config["feedforward_modules"] or []
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module.endswith(name) for name in names)


def _ia3_params(config: dict, module: str, shapes: dict) -> dict:
    return {"feedforward": _ia3_feedforward(config, module), "fan_in_fan_out": bool(config["fan_in_fan_out"])}


def _ia3_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, _ = _two_d(weight, params["fan_in_fan_out"])
    inp = weight[0] if params["fan_in_fan_out"] else weight[1]
    want = inp if params["feedforward"] else out
    found = math.prod(shapes["l"])
    what = "input" if params["feedforward"] else "output"
    return "" if found == want else f"ia3_l has {found} entries, the layer has {want} {what} channels"


def _lycoris_params(config: dict, module: str, shapes: dict) -> dict:
    rank = _pattern(config["rank_pattern"], module, config["r"])
    alpha = _pattern(config["alpha_pattern"], module, config["alpha"])
    if not rank > 0:
        raise InvalidInputError(f"{module}: its rank (r or rank_pattern) is {rank!r}; it must be positive")
    return {"scaling": float(alpha) / rank, "rank": rank, "alpha": float(alpha)}


def _no_check(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    return ""  # LoHa/LoKr: planning's own variant shape check applies


def _vera_params(config: dict, module: str, shapes: dict) -> dict:
    return {"fan_in_fan_out": bool(config["fan_in_fan_out"])}


def _vera_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = _two_d(weight, params["fan_in_fan_out"])
    rank = shapes["d"][0]
    if shapes["A"][0] != rank or shapes["B"][1] != rank or shapes["A"][1] < inp or shapes["B"][0] < out:
        return f"vera_A {list(shapes['A'])}/vera_B {list(shapes['B'])} cannot serve a {out}×{inp} layer at rank {rank}"
    return _expect(shapes, {"b": (out,), "d": (rank,)})


def _oft_params(config: dict, module: str, shapes: dict) -> dict:
    keys = ("coft", "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms")
    return {key: config[key] for key in keys}


def _block_size(elements: int) -> int:
    """b with b·(b−1)/2 = elements (an OFT block's skew-symmetric entries), or 0."""
    size = int((1 + math.isqrt(1 + 8 * elements)) // 2)
    return size if size * (size - 1) // 2 == elements else 0


def _oft_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    _, inp = _two_d(weight)
    blocks, elements = shapes["R"]
    size = _block_size(elements)
    if size == 0 or inp % size or (not params["block_share"] and blocks * size != inp):
        return f"oft_R {list(shapes['R'])} does not make rotations of a layer with {inp} inputs"
    return ""


def _boft_params(config: dict, module: str, shapes: dict) -> dict:
    if shapes["R"][0] != 1:
        raise UnsupportedError(
            f"{module}: BOFT with boft_n_butterfly_factor > 1 ({shapes['R'][0]} butterfly factors) is not "
            "supported yet; merge it with PEFT on a CUDA machine"
        )
    return {"fan_in_fan_out": bool(config["fan_in_fan_out"])}


def _boft_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    if len(weight) != 2:
        return "BOFT on convolutions is not supported yet (PEFT's conv merge scales by boft_s differently)"
    out, inp = _two_d(weight)
    _, blocks, size, _ = shapes["R"]
    if blocks * size != inp or math.prod(shapes["s"]) != out:
        return f"boft_R {list(shapes['R'])}, boft_s {list(shapes['s'])} do not fit a {out}×{inp} layer"
    return ""


def _hra_params(config: dict, module: str, shapes: dict) -> dict:
    return {"apply_GS": bool(config["apply_GS"])}


def _hra_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    _, inp = _two_d(weight)
    return "" if shapes["u"][0] == inp else f"hra_u {list(shapes['u'])} does not fit a layer with {inp} inputs"


def _fourierft_params(config: dict, module: str, shapes: dict) -> dict:
    return {"scaling": float(config["scaling"]), "seed": config["random_loc_seed"],
            "fan_in_fan_out": bool(config["fan_in_fan_out"])}  # fmt: skip


def _fourierft_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = _two_d(weight, params["fan_in_fan_out"])
    count = shapes["spectrum"][0]
    return "" if count <= out * inp else f"{count} frequencies do not fit a {out}×{inp} layer"


def _miss_params(config: dict, module: str, shapes: dict) -> dict:
    init = config["init_weights"]
    return {"fn": init if init in ("bat", "mini") else "miss", "mini_r": config["mini_r"]}


def _miss_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = weight[0], math.prod(weight[1:])
    block = shapes["block"]
    if params["fn"] == "bat":
        r = block[-1]
        ok = len(block) == 3 and out % r == 0 and inp % r == 0 and block[0] == out // r
    elif params["fn"] == "mini":
        ok = len(block) == 2 and block[0] <= inp and out % block[1] == 0
    else:
        ok = len(block) == 2 and block[0] <= inp and block[1] == out
    return "" if ok else f"miss_block {list(block)} does not fit a {out}×{inp} layer ({params['fn']})"


def _randlora_params(config: dict, module: str, shapes: dict) -> dict:
    rank = shapes["lambda"][0]
    return {"scaling": config["randlora_alpha"] / rank, "fan_in_fan_out": bool(config["fan_in_fan_out"])}


def _randlora_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = _two_d(weight, params["fan_in_fan_out"])
    rank, bases = shapes["lambda"]
    low, high = min(out, inp), max(out, inp)
    if bases != math.ceil(low / rank) or tuple(shapes["gamma"]) != (bases, low):
        return (
            f"randlora_lambda {list(shapes['lambda'])}, randlora_gamma {list(shapes['gamma'])} do not fit {out}×{inp}"
        )
    if shapes["A"][0] < rank or shapes["A"][2] < low or shapes["B"][0] < high or shapes["B"][2] < rank:
        return f"randlora_A {list(shapes['A'])}/randlora_B {list(shapes['B'])} cannot serve a {out}×{inp} layer"
    return ""


def _shira_params(config: dict, module: str, shapes: dict) -> dict:
    return {"fan_in_fan_out": bool(config["fan_in_fan_out"])}


def _shira_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    count = shapes["weight"][0]
    return (
        "" if tuple(shapes["indices"]) == (2, count) else f"shira_indices {list(shapes['indices'])} for {count} weights"
    )


def _paca_params(config: dict, module: str, shapes: dict) -> dict:
    return {"scaling": config["paca_alpha"] / config["r"]}  # the config's r, whatever the columns (PEFT 0.22)


def _paca_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, _ = _two_d(weight)
    rows, columns = shapes["delta"]
    if rows != out or tuple(shapes["indices"]) != (columns,):
        return f"paca_delta {list(shapes['delta'])} with paca_indices {list(shapes['indices'])} do not fit {weight}"
    return ""


def _c3a_params(config: dict, module: str, shapes: dict) -> dict:
    return {}


def _c3a_problems(params: dict, shapes: dict, weight: tuple[int, ...]) -> str:
    out, inp = _two_d(weight)
    rows, cols, size = shapes["kernel"]
    return (
        ""
        if (rows * size, cols * size) == (out, inp)
        else f"c3a_kernel {list(shapes['kernel'])} does not make {out}×{inp}"
    )


_LORA_COMMON = {"rank_pattern": {}, "alpha_pattern": {}}

#: Every PEFT tuner lora_tools merges besides LoRA, by `peft_type`.
TUNERS: dict[str, Tuner] = {
    tuner.peft_type: tuner
    for tuner in (
        Tuner("ADALORA", "adalora", {".lora_A": "A", ".lora_B": "B", ".lora_E": "E"}, ("A", "B", "E"),
              {"lora_alpha": 8, "init_r": 12, "fan_in_fan_out": False}, ("linear", "conv1d"),
              "additive", "subtract", _adalora_params, _adalora_problems),
        Tuner("IA3", "ia3", {".ia3_l": "l"}, ("l",), {"feedforward_modules": None, "fan_in_fan_out": False},
              ("linear", "conv1d", "conv2d"), "multiplicative", "divide", _ia3_params, _ia3_problems),
        Tuner("LOHA", "loha", {".hada_w1_a": "w1a", ".hada_w1_b": "w1b", ".hada_w2_a": "w2a", ".hada_w2_b": "w2b",
                               ".hada_t1": "t1", ".hada_t2": "t2"}, ("w1a", "w1b", "w2a", "w2b"),
              {"r": 8, "alpha": 8, **_LORA_COMMON}, ("linear", "conv2d"), "additive", "subtract",
              _lycoris_params, _no_check),
        Tuner("LOKR", "lokr", {".lokr_w1": "k1", ".lokr_w1_a": "k1a", ".lokr_w1_b": "k1b", ".lokr_w2": "k2",
                               ".lokr_w2_a": "k2a", ".lokr_w2_b": "k2b", ".lokr_t2": "kt2"}, (),
              {"r": 8, "alpha": 8, **_LORA_COMMON}, ("linear", "conv2d"), "additive", "subtract",
              _lycoris_params, _no_check),
        Tuner("VERA", "vera", {".vera_lambda_b": "b", ".vera_lambda_d": "d"}, ("b", "d"),
              {"save_projection": True, "fan_in_fan_out": False}, ("linear", "conv1d"), "additive", "subtract",
              _vera_params, _vera_problems, shared={"vera_A": "A", "vera_B": "B"}),
        Tuner("OFT", "oft", {".oft_R.weight": "R", ".oft_embedding_R.weight": "R"}, ("R",),
              {"coft": False, "eps": 6e-5, "block_share": False, "use_cayley_neumann": True,
               "num_cayley_neumann_terms": 5}, ("linear", "conv2d", "embedding"), "multiplicative", "inverse",
              _oft_params, _oft_problems),
        Tuner("BOFT", "boft", {".boft_R": "R", ".boft_s": "s"}, ("R", "s"), {"fan_in_fan_out": False},
              ("linear",), "multiplicative", "inverse", _boft_params, _boft_problems),
        Tuner("HRA", "hra", {".hra_u": "u"}, ("u",), {"apply_GS": False}, ("linear", "conv2d"),
              "multiplicative", "inverse", _hra_params, _hra_problems),
        Tuner("FOURIERFT", "fourierft", {".fourierft_spectrum": "spectrum"}, ("spectrum",),
              {"scaling": 150.0, "random_loc_seed": 777, "fan_in_fan_out": False}, ("linear", "conv1d"),
              "additive", "subtract", _fourierft_params, _fourierft_problems),
        Tuner("MISS", "miss", {".miss_block": "block"}, ("block",), {"init_weights": True, "mini_r": 1},
              ("linear",), "additive", "subtract", _miss_params, _miss_problems),
        Tuner("BONE", "miss", {".bone_block": "block"}, ("block",), {"init_weights": True, "mini_r": 1},
              ("linear",), "additive", "subtract", _miss_params, _miss_problems),
        Tuner("RANDLORA", "randlora", {".randlora_lambda": "lambda", ".randlora_gamma": "gamma",
                                       ".randlora_A": "A", ".randlora_B": "B"}, ("lambda", "gamma"),
              {"randlora_alpha": 640, "fan_in_fan_out": False, "save_projection": True}, ("linear", "conv1d"),
              "additive", "subtract", _randlora_params, _randlora_problems, shared={"randlora_A": "A", "randlora_B": "B"}),
        Tuner("SHIRA", "shira", {".shira_weight": "weight", ".shira_indices": "indices"}, ("weight", "indices"),
              {"fan_in_fan_out": False}, ("linear",), "additive", "subtract", _shira_params, _shira_problems),
        Tuner("C3A", "c3a", {".c3a_kernel": "kernel"}, ("kernel",), {}, ("linear",), "additive", "subtract",
              _c3a_params, _c3a_problems),
        Tuner("PACA", "paca", {".paca_delta": "delta", ".paca_indices": "indices"}, ("delta", "indices"),
              {"r": 8, "paca_alpha": 8}, ("linear",), "additive", "subtract", _paca_params, _paca_problems),
    )
}  # fmt: skip

#: Tuners whose modules are rank-r LoRAs already: `convert --to peft` writes them exactly.
EXACT_LORA = frozenset({"adalora", "vera"})

#: Variants whose merge transforms W instead of adding ΔW (MiSS' "bat" init is one too: `LoraModule.params`).
MULTIPLICATIVE = frozenset(t.variant for t in TUNERS.values() if t.merge == "multiplicative")
_BY_VARIANT: dict[str, Tuner] = {}
for _row in TUNERS.values():  # BONE, MiSS' former name, shares MiSS' arithmetic and row
    if _row.variant not in ("loha", "lokr"):
        _BY_VARIANT.setdefault(_row.variant, _row)


def transforms_weight(module: LoraModule) -> bool:
    """True when the module's merge transforms W (IA3, OFT, BOFT, HRA, MiSS "bat") rather than adding ΔW."""
    if module.variant == "miss":
        return dict(module.params).get("fn") == "bat"
    return module.variant in MULTIPLICATIVE


def tuner_for(peft_type: str) -> Tuner | None:
    return TUNERS.get(peft_type)


def tuner_of_variant(variant: str) -> Tuner | None:
    """The row of a tuner-only variant (not LoHa/LoKr, which LyCORIS files share)."""
    return _BY_VARIANT.get(variant)


def check_tuner_config(path: Path, config: dict) -> None:
    """Refuse a peft_type lora_tools does not merge (naming the ones it does), and merge fields of the wrong type."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in TUNERS:
        known = ", ".join(["LORA", *TUNERS])
        raise UnknownFormatError(f"{path}: peft_type {peft_type!r} is not supported (supported: {known})")
    for key, default in TUNERS[peft_type].defaults.items():
        value = config.get(key)
        if value is not None and not _same_kind(value, default):
            raise CorruptFileError(path, f"adapter_config.json field {key!r} has the wrong type: {value!r}")


def _same_kind(value: object, default: object) -> bool:
    """Whether a config value has the type PEFT expects for a field with this default."""
    if isinstance(default, bool):
        return isinstance(value, bool) or value in ("bat", "mini")  # MiSS' init_weights names its inits
    if isinstance(default, int | float):
        return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if isinstance(default, dict):
        return isinstance(value, dict) and all(
            not isinstance(v, bool) and isinstance(v, int | float) and v > 0 for v in value.values()
        )
    return isinstance(value, str | list)  # module name lists (IA3's feedforward_modules)


def _with_defaults(tuner: Tuner, config: dict) -> dict:
    """The config as PEFT reads it: every merge field present, missing (or null) ones at PEFT's default."""
    filled = dict(config)
    for key, default in tuner.defaults.items():
        if filled.get(key) is None:
            filled[key] = default
    return filled


def _split(tuner: Tuner, key: str) -> tuple[str, str] | None:
    if not key.startswith(_PREFIX):
        return None
    for suffix, role in sorted(tuner.roles.items(), key=lambda item: -len(item[0])):
        if key.endswith(suffix):
            return key[len(_PREFIX) : -len(suffix)], role
    return None


def build_tuner_adapter(path: Path, weights: Checkpoint, config: dict) -> Adapter:
    """Group a PEFT tuner's tensors into modules (one per adapted layer), with their parameters.

    Raises:
        CorruptFileError: a module lacks a tensor its tuner needs.
        UnsupportedError: a setting lora_tools cannot merge from files (VeRA without its projections).
    """
    tuner = TUNERS[config["peft_type"]]
    config = _with_defaults(tuner, config)
    if tuner.shared and not config["save_projection"]:
        shared = "/".join(f"{_SHARED_PREFIX}{key}" for key in tuner.shared)
        raise UnsupportedError(
            f"{path}: this {tuner.peft_type} adapter was saved with save_projection=false, so its shared random "
            f"projections ({shared}) are not in the file and only PEFT's own generator makes them again; "
            "save it with save_projection=True to merge it from files"
        )
    grouped: dict[str, dict[str, str]] = {}
    shared: dict[str, str] = {}
    replacements: list[Replacement] = []
    unknown: list[str] = []
    to_save = implicit_modules_to_save(config)  # task heads, suffixes, sub-module trees (`peft_rules`)
    for key in weights.tensors:
        name = key.removeprefix(_SHARED_PREFIX)
        if key.startswith(_SHARED_PREFIX) and name in tuner.shared:
            shared[tuner.shared[name]] = key
            continue
        if key.startswith(_PREFIX) and key.endswith(".base_layer.weight"):  # PEFT saves a targeted embedding's
            target = key[len(_PREFIX) : -len(".base_layer.weight")] + ".weight"
            replacements.append(Replacement(target, key, origin="saved base layer"))
            continue
        split = _split(tuner, key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = key
            continue
        saved = saved_tensor(key.removeprefix(_PREFIX), config, to_save)  # PEFT's rules, as for LoRA
        if saved == WRAPPER_COPY:
            continue
        if saved is not None:
            replacements.append(Replacement(saved[0], key, origin=saved[1]))
            continue
        unknown.append(key)
    modules = [_module(path, tuner, config, name, {**shared, **roles}, weights) for name, roles in grouped.items()]
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m.name)])
    return Adapter(path=path, format="peft", modules=modules, replacements=replacements, unknown_keys=unknown,
                   weights=weights, config=config, base_model=config.get("base_model_name_or_path") or None)  # fmt: skip


def _module(path: Path, tuner: Tuner, config: dict, name: str, roles: dict, weights: Checkpoint) -> LoraModule:
    missing = [role for role in (*tuner.required, *tuner.shared.values()) if role not in roles]
    if missing:
        wanted = {**{r: s for s, r in tuner.roles.items()}, **{r: f"base_model.{s}" for s, r in tuner.shared.items()}}
        names = ", ".join(wanted[r].lstrip(".") for r in missing)
        raise CorruptFileError(path, f"{tuner.peft_type} module {name!r} lacks {names}")
    shapes = {role: tuple(weights.tensors[key].shape) for role, key in roles.items()}
    params = tuner.params(config, name, shapes)
    first = roles[tuner.required[0]] if tuner.required else next(iter(roles.values()))
    rank = _rank(tuner, shapes, params)
    scale = params.pop("scaling") if tuner.variant in ("loha", "lokr") else 1.0
    alpha = params.pop("alpha", 0.0)
    params.pop("rank", None)
    bias = roles["l"] if tuner.variant == "ia3" and not params["feedforward"] else None
    kind = "embedding" if any("_embedding_" in key for key in roles.values()) else "linear"
    return LoraModule(
        name=name, kind=kind, a_key=first, b_key=first, a_shape=shapes[_role_of(roles, first)],
        b_shape=shapes[_role_of(roles, first)], rank=rank, alpha=alpha, scale=scale,
        fan_in_fan_out=bool(params.get("fan_in_fan_out", False)), bias_key=bias, variant=tuner.variant,
        factors=tuple(sorted(roles.items())), params=tuple(sorted(params.items())),
    )  # fmt: skip


def _role_of(roles: dict, key: str) -> str:
    return next(role for role, k in roles.items() if k == key)


def _rank(tuner: Tuner, shapes: dict, params: dict) -> int:
    """The module's rank as its tuner counts it (0 where the word does not apply)."""
    if "rank" in params:
        return int(params["rank"])
    rank_roles = {"adalora": ("A", 0), "vera": ("d", 0), "hra": ("u", 1), "randlora": ("lambda", 0)}
    role, axis = rank_roles.get(tuner.variant, (None, 0))
    return int(shapes[role][axis]) if role in shapes else 0


def tuner_problems(module: LoraModule, shapes: Mapping[str, tuple[int, ...]], weight: tuple[int, ...]) -> str:
    """What about a tuner module does not fit a base weight of shape `weight` ('' when it fits)."""
    tuner = _BY_VARIANT[module.variant]
    try:
        return tuner.problems(dict(module.params), dict(shapes), tuple(weight))
    except (KeyError, IndexError, ValueError):
        found = ", ".join(f"{role} {list(shape)}" for role, shape in sorted(shapes.items()))
        return f"its tensors ({found}) do not make a {tuner.peft_type} module"


def tuner_delta_shape(module: LoraModule, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """ΔW's shape from a tuner module's own tensors, or None where only the base weight says it
    (VeRA, FourierFT, MiSS, RandLoRA, SHiRA and PaCA slice or place into the layer; the transforms act on W)."""
    params = dict(module.params)
    if module.variant == "adalora":
        out, inp = shapes["B"][0], shapes["A"][1]
        return (inp, out) if params["fan_in_fan_out"] else (out, inp)
    if module.variant == "c3a":
        rows, cols, size = shapes["kernel"]
        return rows * size, cols * size
    return None


_LAYER_NAMES = {"linear": "Linear", "conv1d": "Conv1D", "conv2d": "Conv2d", "embedding": "Embedding"}
_UNMERGE = {"subtract": "W' − ΔW", "divide": "W' ÷ l (refused for zero scales)", "inverse": "inverse rotation"}


def support_table() -> list[str]:
    """What lora_tools does with each tuner, as the markdown table the README and the docs show."""
    lines = ["| tuner | layers | merge | unmerge | `convert --to peft` | `--stats` |", "|---|---|---|---|---|---|"]
    for tuner in TUNERS.values():
        probe = LoraModule("m", "linear", "", "", (), (), 0, 0.0, 1.0, variant=tuner.variant)
        merge = "W → W'" if transforms_weight(probe) else "W + ΔW"
        if tuner.variant == "miss":
            merge += " (`bat`: W → W')"
        if tuner.variant in EXACT_LORA:
            convert = "exact, rank r" + (" (`--base`)" if tuner.shared else "")
        else:
            convert = "`--rank N --base`" if tuner.merge == "multiplicative" else "`--rank N`"
        self_shaped = tuner.merge == "additive" and tuner.variant in ("adalora", "c3a", "loha", "lokr")
        stats = "yes" if self_shaped else "with `--base`"
        layers = ", ".join(_LAYER_NAMES[layer] for layer in tuner.layers)
        unmerge = _UNMERGE[tuner.unmerge] if tuner.unmerge else "refused"
        if tuner.variant == "miss":
            unmerge += " (`bat`: inverse)"
        lines.append(f"| {tuner.peft_type} | {layers} | {merge} | {unmerge} | {convert} | {stats} |")
    return lines


def needs_lora_first(adapter: Adapter) -> bool:
    """Whether `adapter` is a PEFT tuner whose modules are not LoRA factors (LoHa and LoKr are LyCORIS ones,
    which kohya files carry): it becomes a LoRA (`convert --to peft`) before anything LoRA-only takes it."""
    peft_type = adapter.config.get("peft_type") if adapter.format == "peft" else None
    return peft_type in TUNERS and peft_type not in ("LOHA", "LOKR")


def refuse_tuner(adapter: Adapter, action: str) -> None:
    """Refuse an operation defined for LoRA factors (resize, combine) on another tuner, naming the conversion
    that makes it a LoRA first."""
    if needs_lora_first(adapter):
        peft_type = adapter.config["peft_type"]
        raise UnsupportedError(
            f"{adapter.path}: a {peft_type} adapter cannot be {action} as it is; write it as a LoRA first: "
            "loratool convert ADAPTER --to peft --base BASE -o LORA (add --rank N unless it is AdaLoRA or VeRA)"
        )
