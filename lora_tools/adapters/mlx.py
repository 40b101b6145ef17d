"""mlx-lm adapter folders: `adapters.safetensors` + `adapter_config.json`, read and written.

mlx-lm stores a linear layer's factors transposed from PEFT's (`lora_a` [in, r], `lora_b` [r, out];
ΔW = scale · lora_bᵀ · lora_aᵀ) and an absolute `scale` in `lora_parameters` instead of α/r. DoRA
layers add `m`, the per-output-row magnitude (PEFT's lora_magnitude_vector). `LoRASwitchLinear`
(mixture-of-experts) stores per-expert factors stacked, already in PEFT's orientation:
`lora_a` [E, r, in], `lora_b` [E, out, r]. Module paths are transformers' (`model.layers.0.self_attn.q_proj`),
except the stacked experts, renamed by `SWITCH_EXPERTS`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CorruptFileError, InvalidInputError, UnsupportedError
from ..io.checkpoint import open_checkpoint, read_json
from ..io.derived import DerivedCheckpoint
from ..io.spool import Spool
from .model import Adapter, LoraModule

__all__ = ["SWITCH_EXPERTS", "detect", "read", "write_mlx", "check_mlx_output"]

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
_ROLES = {"lora_a": "a", "lora_b": "b", "m": "magnitude"}

#: mlx-lm's stacked-expert module → the per-expert HF module ({e} = expert index). From mlx-lm 0.32's
#: `sanitize` of mixtral.py (w1/w3/w2 → gate/up/down) and qwen2_moe.py / qwen3_moe.py (mlp.experts.N.*).
SWITCH_EXPERTS = (
    (r"\.block_sparse_moe\.switch_mlp\.gate_proj$", ".block_sparse_moe.experts.{e}.w1"),
    (r"\.block_sparse_moe\.switch_mlp\.up_proj$", ".block_sparse_moe.experts.{e}.w3"),
    (r"\.block_sparse_moe\.switch_mlp\.down_proj$", ".block_sparse_moe.experts.{e}.w2"),
    (r"\.mlp\.switch_mlp\.(gate_proj|up_proj|down_proj)$", r".mlp.experts.{e}.\1"),
)
#: Module names mlx-lm turns into LoRAEmbedding (lora_a [vocab, r], lora_b [r, dims]).
_EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|tok_embeddings|word_embeddings)$")


def detect(path: Path) -> bool:
    """An mlx-lm adapter folder: its weights, and a config with `lora_parameters`."""
    if not (path.is_dir() and (path / WEIGHTS_NAME).is_file() and (path / CONFIG_NAME).is_file()):
        return False
    try:
        return "lora_parameters" in json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _expert_name(module: str, expert: int, path: Path) -> str:
    for pattern, replacement in SWITCH_EXPERTS:
        if re.search(pattern, module):
            return re.sub(pattern, replacement.replace("{e}", str(expert)), module)
    raise UnsupportedError(f"{path}: {module} holds stacked experts in a layout lora_tools has no HF name for")


def _settings(path: Path, config: dict) -> tuple[int, float, str]:
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UnsupportedError(f"{path}: fine_tune_type {kind!r} is not an adapter (only lora and dora are)")
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or "scale" not in params or "rank" not in params:
        raise CorruptFileError(path / CONFIG_NAME, "lora_parameters must hold 'rank' and 'scale' (mlx-lm's format)")
    scale, rank = params["scale"], params["rank"]
    if isinstance(scale, bool) or not isinstance(scale, int | float) or type(rank) is not int or rank <= 0:
        raise CorruptFileError(path / CONFIG_NAME, f"lora_parameters rank {rank!r} / scale {scale!r} are not numbers")
    return rank, float(scale), kind


def read(path: Path, *, alpha: float | None = None) -> Adapter:
    """An mlx-lm adapter folder as the normalized model (PEFT-layout factors, ΔW = scale · B·A)."""
    config = read_json(path / CONFIG_NAME, CONFIG_NAME)
    _, scale, _ = _settings(path, config)
    weights = open_checkpoint(path / WEIGHTS_NAME)
    grouped: dict[str, dict[str, str]] = {}
    unknown = []
    for key in weights.tensors:
        module, _, leaf = key.rpartition(".")
        if leaf in _ROLES and module:
            grouped.setdefault(module, {})[_ROLES[leaf]] = key
        else:
            unknown.append(key)
    entries: dict = {}
    modules = []
    for module, roles in grouped.items():
        if "a" not in roles or "b" not in roles:
            raise CorruptFileError(path / WEIGHTS_NAME, f"{module} lacks {'lora_b' if 'a' in roles else 'lora_a'}")
        modules += _modules(path, weights, module, roles, scale, alpha, entries)
    derived = DerivedCheckpoint.build(path, path / WEIGHTS_NAME, entries, dict(weights.metadata))
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m.name)])
    return Adapter(path, "mlx", modules, [], unknown, derived, config=config)


def _modules(path, weights, module: str, roles: dict, scale: float, alpha, entries: dict) -> list[LoraModule]:
    a_info, b_info = weights.tensors[roles["a"]], weights.tensors[roles["b"]]
    read = weights.read

    def made(name, kind, a_key, b_key, a_shape, b_shape, magnitude_key=None):
        rank = a_shape[0]
        module_scale = alpha / rank if alpha is not None else scale
        return LoraModule(
            name, kind, a_key, b_key, a_shape, b_shape, rank, module_scale * rank, module_scale,
            magnitude_key=magnitude_key,
        )  # fmt: skip

    if len(a_info.shape) == 2 and len(b_info.shape) == 2:
        (size_in, rank), (rank_b, size_out) = a_info.shape, b_info.shape
        if rank != rank_b:
            raise CorruptFileError(path / WEIGHTS_NAME, f"{module}: lora_a {list(a_info.shape)} and lora_b "
                                   f"{list(b_info.shape)} do not share a rank")  # fmt: skip
        entries[roles["a"]] = (a_info.dtype, (rank, size_in), lambda k=roles["a"]: read(k).T)
        entries[roles["b"]] = (b_info.dtype, (size_out, rank), lambda k=roles["b"]: read(k).T)
        magnitude = roles.get("magnitude")
        if magnitude is not None:
            info = weights.tensors[magnitude]
            entries[magnitude] = (info.dtype, info.shape, lambda k=magnitude: read(k))
        kind = "embedding" if _EMBEDDINGS.search(module) else "linear"
        return [made(module, kind, roles["a"], roles["b"], (rank, size_in), (size_out, rank), magnitude)]
    if len(a_info.shape) == 3 and len(b_info.shape) == 3 and "magnitude" not in roles:
        experts, rank, size_in = a_info.shape
        size_out = b_info.shape[1]
        if b_info.shape != (experts, size_out, rank):
            raise CorruptFileError(path / WEIGHTS_NAME, f"{module}: expert lora_b {list(b_info.shape)} does not "
                                   f"fit lora_a {list(a_info.shape)}")  # fmt: skip
        found = []
        for e in range(experts):
            a_key, b_key = f"{roles['a']}[{e}]", f"{roles['b']}[{e}]"
            entries[a_key] = (a_info.dtype, (rank, size_in), lambda k=roles["a"], e=e: read(k)[e])
            entries[b_key] = (b_info.dtype, (size_out, rank), lambda k=roles["b"], e=e: read(k)[e])
            found.append(made(_expert_name(module, e, path), "linear", a_key, b_key, (rank, size_in), (size_out, rank)))
        return found
    raise CorruptFileError(
        path / WEIGHTS_NAME, f"{module}: lora_a {list(a_info.shape)} / lora_b {list(b_info.shape)} fit no mlx-lm layer"
    )


# --- writing ----------------------------------------------------------------------------------------


def _layer_key(name: str) -> tuple[int | None, str]:
    """`model.layers.3.self_attn.q_proj` → (3, "self_attn.q_proj"); other modules keep their full path."""
    found = re.match(r"^(?:.*\.)?layers\.(\d+)\.(.+)$", name)
    return (int(found.group(1)), found.group(2)) if found else (None, name)


def write_mlx(
    adapter: Adapter, modules: list[LoraModule], target: Path, config: dict | None, *, bake_alpha: bool
) -> tuple[int, list[str]]:
    """Write `modules` as an mlx-lm adapter folder in `target`; return (bytes, notes)."""
    ranks = sorted({m.rank for m in modules})
    if len(ranks) > 1:
        raise UnsupportedError(
            f"{adapter.path}: mlx-lm adapters have one rank, found {ranks}; run loratool resize --rank N first"
        )
    scales = sorted({m.scale for m in modules})
    if len(scales) > 1 and not bake_alpha:
        raise UnsupportedError(
            f"{adapter.path}: mlx-lm adapters have one scale, found {', '.join(f'{s:g}' for s in scales)}; "
            "pass --bake-alpha to fold each module's scale into lora_b (scale 1)"
        )
    dora = {m.dora for m in modules}
    if len(dora) > 1:
        raise UnsupportedError(f"{adapter.path}: mlx-lm makes every layer DoRA or none; this adapter mixes them")
    layers, keys = [], set()
    spool = Spool(target / ".factors.spool")
    try:
        for module in modules:
            layer, key = _layer_key(module.name)
            layers.append(layer if layer is not None else -1)
            keys.add(key)
            b = adapter.read(module.b_key)
            if bake_alpha:
                b = (b.double() * module.scale).to(b.dtype)
            spool.add(f"{module.name}.lora_a", adapter.read(module.a_key).T.contiguous())
            spool.add(f"{module.name}.lora_b", b.T.contiguous())
            if module.magnitude_key is not None:
                spool.add(f"{module.name}.m", adapter.read(module.magnitude_key).reshape(-1))
        size = spool.finish(target / WEIGHTS_NAME, metadata={"format": "mlx"})
    finally:
        spool.path.unlink(missing_ok=True)
    text = (config or {}).get("text_config") or config or {}
    num_layers = int(text.get("num_hidden_layers") or (max(layers) + 1))
    settings = {
        "fine_tune_type": "dora" if True in dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {
            "rank": ranks[0],
            "scale": 1.0 if bake_alpha else scales[0],
            "dropout": 0.0,
            "keys": sorted(keys),
        },
    }
    if adapter.base_model:
        settings["model"] = adapter.base_model
    (target / CONFIG_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    notes = []
    if min(layers) > 0 or len(set(layers) - {-1}) < num_layers:
        notes.append("mlx-lm adds LoRA layers to every one of the last num_layers blocks; those this adapter does "
                     "not cover load with lora_b = 0 (no change)")  # fmt: skip
    return size, notes


def check_mlx_output(path: Path) -> None:
    """Refuse an output path that is not a folder name (mlx-lm adapters are folders)."""
    if path.suffix in (".safetensors", ".gguf", ".json"):
        raise InvalidInputError(f"mlx-lm adapters are folders: give an --output folder, not {path}")
