"""GGUF LoRA adapters, as llama.cpp / Ollama / LM Studio load them: written from any LoRA, read back.

A GGUF LoRA holds, per adapted base tensor `T` (a GGUF name such as `blk.0.attn_q.weight`),
`T.lora_a` [r, in] and `T.lora_b` [out, r] (numpy order; GGUF's `ne` is the reverse), and one
global `adapter.lora.alpha`: llama.cpp scales each pair by alpha / r. The per-architecture
names and transformations are `layouts.gguf`'s table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError, UnknownFormatError, UnsupportedError
from ..io.derived import DerivedCheckpoint
from ..layouts.gguf import (
    GGUF_LAYOUTS,
    GgufLayout,
    block_count,
    gguf_module,
    gguf_names,
    head_counts,
    hf_candidates,
    layout_for,
    permutation_heads,
    permute_rows,
    unpermute_rows,
)
from .model import Adapter, LoraModule

if TYPE_CHECKING:
    import torch

__all__ = ["HF_NAMES_KEY", "GgufPlan", "plan_gguf", "write_gguf", "detect", "read", "bind_base_config"]

#: Our own metadata: GGUF base tensor → the HF module it came from (llama.cpp ignores unknown keys).
HF_NAMES_KEY = "lora_tools.hf_modules"


#: GGUF dtypes we read and write, as safetensors names.
_GGUF_FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


# --- writing ----------------------------------------------------------------------------------------


@dataclass
class GgufPlan:
    """What goes into the file: per module its GGUF name, the B row permutation, the B factor."""

    layout: GgufLayout
    alpha: float
    names: dict[str, str]
    heads: dict[str, int]
    b_factors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def plan_gguf(modules: list[LoraModule], config: dict, where: object) -> GgufPlan:
    """Pure: names, the global alpha, and the modules whose scale must be folded into B."""
    layout = layout_for(config, where)
    names, missing = gguf_names([m.name for m in modules], layout, block_count(config))
    if missing:
        raise UnsupportedError(
            f"{where}: no GGUF tensor for {', '.join(missing[:5])} in llama.cpp's {layout.arch.lower()} layout; "
            "merge those modules instead (loratool merge)"
        )
    effective = [m.scale * m.rank for m in modules]
    alpha = max(set(effective), key=effective.count) if effective else 1.0
    plan = GgufPlan(layout, alpha, names, head_counts(config))
    for module, value in zip(modules, effective, strict=True):
        if value != alpha:
            plan.b_factors[module.name] = value / alpha
            plan.notes.append(
                f"{module.name}: scale {module.scale:g} differs from alpha/r = {alpha:g}/{module.rank}; "
                "folded into lora_b (one rounding)"
            )
    return plan


def _numpy(tensor: torch.Tensor):
    import torch

    if tensor.dtype not in (torch.float32, torch.float16):
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def write_gguf(adapter: Adapter, modules: list[LoraModule], plan: GgufPlan, target: Path) -> int:
    """Write the planned modules of `adapter` to `target`; return the file size."""
    gguf = gguf_module()
    import torch

    writer = gguf.GGUFWriter(path=str(target), arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, plan.layout.arch)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    if "num_attention_heads" in plan.heads:
        writer.add_head_count(plan.heads["num_attention_heads"])
    if "num_key_value_heads" in plan.heads:
        writer.add_head_count_kv(plan.heads["num_key_value_heads"])
    writer.add_string(HF_NAMES_KEY, json.dumps({plan.names[m.name]: m.name for m in modules}, sort_keys=True))
    for module in modules:
        a, b = adapter.read(module.a_key), adapter.read(module.b_key)
        if module.name in plan.b_factors:
            b = (b.double() * plan.b_factors[module.name]).to(b.dtype)
        heads = permutation_heads(plan.layout, module.name, plan.heads)
        if heads is not None:
            b = permute_rows(b, heads)
        if module.kind == "embedding":
            a = a.T  # llama.cpp gathers token rows of lora_a (llm_build_inp_embd)
        dtype = torch.float16 if a.dtype == b.dtype == torch.float16 else torch.float32
        writer.add_tensor(f"{plan.names[module.name]}.lora_a", _numpy(a.to(dtype)))
        writer.add_tensor(f"{plan.names[module.name]}.lora_b", _numpy(b.to(dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target.stat().st_size


# --- reading ----------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    """A file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _field(reader, key: str):
    found = reader.get_field(key)
    return None if found is None else found.contents()


@dataclass
class _Heads:
    """Head counts for un-permuting q/k: from the file, or later from the base's config."""

    layout: GgufLayout
    counts: dict[str, int]
    path: Path

    def for_module(self, module: str) -> int | None:
        if not any(module.endswith(f".{p}") for p, _ in self.layout.row_permutations):
            return None
        count = permutation_heads(self.layout, module, self.counts)
        if count is None:
            raise InvalidInputError(
                f"{self.path}: {module} is stored with llama.cpp's rotary row order and the file does not say the "
                "head counts; pass --base (the base model folder) to read it"
            )
        return count


def _torch_of(tensor, path: Path) -> tuple[str, Callable[[], torch.Tensor]]:
    kind = tensor.tensor_type.name
    if kind not in _GGUF_FLOATS:
        raise UnsupportedError(
            f"{path}: {tensor.name} is stored as {kind}; only F32, F16 and BF16 LoRA tensors are read"
        )

    def load() -> torch.Tensor:
        import numpy as np
        import torch

        data = np.array(tensor.data)
        if kind == "BF16":
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(data)

    return _GGUF_FLOATS[kind], load


def read(path: Path, *, alpha: float | None = None) -> Adapter:
    """A GGUF LoRA as the normalized model: PEFT-layout factors, HF module names, llama.cpp's scale."""
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as exc:
        raise CorruptFileError(path, f"not a readable GGUF file ({exc})") from exc
    if _field(reader, "general.type") != "adapter" or _field(reader, gguf.Keys.Adapter.TYPE) != "lora":
        raise UnknownFormatError(f"{path}: a GGUF file, but not a LoRA adapter (general.type / adapter.type)")
    arch_name = _field(reader, "general.architecture")
    arch = next((m.name for m, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise UnsupportedError(f"{path}: unknown GGUF architecture {arch_name!r}")
    file_alpha = _field(reader, gguf.Keys.Adapter.LORA_ALPHA)
    alpha = float(alpha if alpha is not None else file_alpha if file_alpha is not None else 0.0)
    layout = next((v for v in GGUF_LAYOUTS.values() if v.arch == arch), GgufLayout(arch))
    counts = {
        field_name: int(value)
        for field_name, key in (("num_attention_heads", "head_count"), ("num_key_value_heads", "head_count_kv"))
        if (value := _field(reader, f"{arch_name}.attention.{key}")) is not None
    }
    heads = _Heads(layout, counts, path)
    pairs: dict[str, dict[str, object]] = {}
    unknown = []
    for tensor in reader.tensors:
        base, _, role = tensor.name.rpartition(".")
        if role in ("lora_a", "lora_b"):
            pairs.setdefault(base, {})[role] = tensor
        else:
            unknown.append(tensor.name)
    blocks = 1 + max((int(m.group(1)) for n in pairs if (m := re.match(r"blk\.(\d+)\.", n))), default=-1)
    recorded = json.loads(_field(reader, HF_NAMES_KEY) or "{}")
    candidates = hf_candidates(arch, blocks)
    entries, modules = {}, []
    for base, roles in pairs.items():
        if len(roles) != 2:
            raise CorruptFileError(path, f"{base} has {next(iter(roles))} but not its partner")
        name = recorded.get(base) or (candidates.get(base) or [None])[0]
        if name is None:
            unknown.extend(f"{base}.{r}" for r in roles)
            continue
        module = _gguf_module(path, base, name, roles, heads, alpha, entries)
        modules.append(module)
    metadata = {"general.architecture": str(arch_name), "adapter.lora.alpha": f"{alpha:g}"}
    weights = DerivedCheckpoint.build(path, path, entries, metadata)
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m.name)])
    return Adapter(path, "gguf", modules, [], unknown, weights, config={"gguf_heads": heads})


def _gguf_module(path, base, name, roles, heads: _Heads, alpha, entries) -> LoraModule:
    a_tensor, b_tensor = roles["lora_a"], roles["lora_b"]
    a_shape, b_shape = tuple(int(d) for d in a_tensor.data.shape), tuple(int(d) for d in b_tensor.data.shape)
    embedding = base.startswith("token_embd.")
    if embedding:
        a_shape = a_shape[::-1]
    rank = a_shape[0]
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
        raise CorruptFileError(path, f"{base}: lora_a {list(a_shape)} and lora_b {list(b_shape)} do not share a rank")
    a_dtype, load_a = _torch_of(a_tensor, path)
    b_dtype, load_b = _torch_of(b_tensor, path)

    def read_a():
        return load_a().T if embedding else load_a()

    def read_b():
        count = heads.for_module(name)
        return load_b() if count is None else unpermute_rows(load_b(), count)

    entries[f"{base}.lora_a"] = (a_dtype, a_shape, read_a)
    entries[f"{base}.lora_b"] = (b_dtype, b_shape, read_b)
    return LoraModule(
        name=name,
        kind="embedding" if embedding else "linear",
        a_key=f"{base}.lora_a",
        b_key=f"{base}.lora_b",
        a_shape=a_shape,
        b_shape=b_shape,
        rank=rank,
        alpha=alpha,
        scale=alpha / rank if alpha else 1.0,  # llama.cpp: alpha 0 means scale 1
    )


def bind_base_config(adapter: Adapter, config: dict | None) -> Adapter:
    """Give a GGUF adapter the base's head counts when its file does not record them."""
    heads = adapter.config.get("gguf_heads") if adapter.format == "gguf" else None
    if heads is not None and config:
        for key, value in head_counts(config).items():
            heads.counts.setdefault(key, value)
    return adapter
