"""GGUF LoRA adapters, as llama.cpp / Ollama / LM Studio load them: written from any LoRA, read back.

A GGUF LoRA holds, per adapted base tensor `T` (a GGUF name such as `blk.0.attn_q.weight`),
`T.lora_a` [r, in] and `T.lora_b` [out, r] (numpy order; GGUF's `ne` is the reverse), and one
global `adapter.lora.alpha`: llama.cpp scales each pair by alpha / r. The per-architecture
names and transformations are `layouts.gguf`'s table.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptFileError, InvalidInputError, UnknownFormatError, UnsupportedError
from ..io.derived import DerivedCheckpoint
from ..layouts.gguf import (
    ExpertPart,
    GgufLayout,
    block_count,
    expert_slot,
    fused_parts,
    gguf_module,
    gguf_names,
    gguf_problems,
    head_counts,
    hf_candidates,
    layout_for,
    layout_of_arch,
    reorder_rows,
    restore_rows,
    row_order,
)
from ..layouts.transformers import layout_for as transformers_layout
from ..layouts.transformers import to_memory_path
from .inits import ALORA_TOKENS, invocation_tokens
from .model import Adapter, LoraModule

if TYPE_CHECKING:
    import torch

__all__ = ["HF_NAMES_KEY", "GgufPlan", "plan_gguf", "write_gguf", "detect", "read", "bind_base_config"]

#: Our own metadata: GGUF base tensor → the HF module it came from (llama.cpp ignores unknown keys).
HF_NAMES_KEY = "lora_tools.hf_modules"


#: GGUF dtypes we read and write, as safetensors names.
_GGUF_FLOATS = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


# --- writing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One GGUF factor pair, or one expert's slice of a stacked pair: the module it reads, the HF module it is."""

    module: LoraModule
    name: str
    scale: float
    part: ExpertPart | None = None

    @property
    def rank(self) -> int:
        return self.module.rank // self.part.experts if self.part else self.module.rank


@dataclass
class GgufPlan:
    """What goes into the file: per GGUF base tensor its pieces (experts in index order), the B factors."""

    layout: GgufLayout
    alpha: float
    tensors: dict[str, list[_Piece]]
    heads: dict[str, int]
    b_factors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _pieces(layout: GgufLayout, module: LoraModule, config: dict, expert_scale: Callable | None) -> list[_Piece]:
    parts = fused_parts(layout, module.name, module.a_shape, module.b_shape, config)
    if not isinstance(parts, list):
        return [_Piece(module, module.name, module.scale)]
    # PEFT scales a fused-experts LoRA by its per-expert rank r (A holds E·r rows), alpha per parameter
    rank = module.rank // parts[0].experts
    scales = {p.param: expert_scale(f"{module.name}.{p.param}", rank) if expert_scale else module.alpha / rank
              for p in parts}  # fmt: skip
    return [_Piece(module, p.name, scales[p.param], p) for p in parts]


def plan_gguf(
    modules: list[LoraModule], config: dict, where: object, expert_scale: Callable[[str, int], float] | None = None
) -> GgufPlan:
    """Pure: names, expert stacks, the global alpha, and the modules whose scale must be folded into B.

    `expert_scale(parameter path, per-expert rank)`: PEFT's scale of a LoRA on fused experts (its
    alpha_pattern / rsLoRA); alpha / r when not given.
    """
    layout = layout_for(config, where)
    problems = gguf_problems(layout, {m.name: (m.a_shape, m.b_shape) for m in modules}, config)
    if problems:
        raise UnsupportedError(
            f"{where}: llama.cpp's GGUF LoRA cannot carry {'; '.join(problems[:4])}"
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + " — merge those modules instead (loratool merge)"
        )
    pieces = [piece for module in modules for piece in _pieces(layout, module, config, expert_scale)]
    names, _ = gguf_names([p.name for p in pieces], layout, block_count(config))
    tensors: dict[str, list[_Piece]] = {}
    for piece in sorted(pieces, key=lambda p: (expert_slot(layout, p.name) or ("", 0))[1]):
        tensors.setdefault(names[piece.name], []).append(piece)
    effective = {p.name: p.scale * p.rank for p in pieces}
    values = list(effective.values())
    alpha = max(set(values), key=values.count) if values else 1.0
    plan = GgufPlan(layout, alpha, tensors, head_counts(layout, config))
    for piece in pieces:
        if (value := effective[piece.name]) != alpha:
            plan.b_factors[piece.name] = value / alpha
            plan.notes.append(
                f"{piece.name}: scale {piece.scale:g} differs from alpha/r = {alpha:g}/{piece.rank}; "
                "folded into lora_b (one rounding)"
            )
    return plan


def _numpy(tensor: torch.Tensor):
    import torch

    if tensor.dtype not in (torch.float32, torch.float16):
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def _factors(read: Callable, piece: _Piece, plan: GgufPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece's (lora_a, lora_b) as llama.cpp's converter writes them (an expert's A rows e·r…, B columns e::E)."""
    module = piece.module
    a, b = read(module.a_key), read(module.b_key)
    if piece.part is not None:
        part, rank = piece.part, piece.rank
        a, b = a[part.expert * rank : (part.expert + 1) * rank], b[part.start : part.stop, part.expert :: part.experts]
    if piece.name in plan.b_factors:
        b = (b.double() * plan.b_factors[piece.name]).to(b.dtype)
    try:
        b = reorder_rows(b, row_order(plan.layout, piece.name, b.shape[0], plan.heads))
    except KeyError as exc:
        raise InvalidInputError(f"{module.name}: llama.cpp reorders its rows by head count; the base's config.json "
                                f"has no {' / '.join(plan.layout.heads)}") from exc  # fmt: skip
    if module.kind == "embedding":
        a = a.T  # llama.cpp gathers token rows of lora_a (llm_build_inp_embd)
    return a, b


def write_gguf(adapter: Adapter, modules: list[LoraModule], plan: GgufPlan, target: Path) -> int:
    """Write the planned modules of `adapter` to `target`; return the file size."""
    gguf = gguf_module()
    import torch

    writer = gguf.GGUFWriter(path=str(target), arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, plan.layout.arch)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, plan.alpha)
    tokens = invocation_tokens(adapter.config)
    if tokens is not None:  # an activated LoRA, as llama.cpp's converter records it
        writer.add_array(gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS, tokens)
    if "heads" in plan.heads:
        writer.add_head_count(plan.heads["heads"])
    if "kv_heads" in plan.heads:
        writer.add_head_count_kv(plan.heads["kv_heads"])
    recorded = {name: [p.name for p in group] if len(group) > 1 else group[0].name
                for name, group in plan.tensors.items()}  # fmt: skip
    writer.add_string(HF_NAMES_KEY, json.dumps(recorded, sort_keys=True))
    read = functools.lru_cache(maxsize=2)(adapter.read)  # a fused-experts module is sliced once per expert
    for name, group in plan.tensors.items():
        pairs = [_factors(read, piece, plan) for piece in group]
        a, b = pairs[0] if len(group) == 1 else (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))
        dtype = torch.float16 if a.dtype == b.dtype == torch.float16 else torch.float32
        writer.add_tensor(f"{name}.lora_a", _numpy(a.to(dtype)))
        writer.add_tensor(f"{name}.lora_b", _numpy(b.to(dtype)))
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
    """Head counts for restoring llama.cpp's row orders: from the file, or later from the base's config."""

    layout: GgufLayout
    counts: dict[str, int]
    path: Path

    def order(self, module: str, rows: int) -> list[int] | None:
        try:
            return row_order(self.layout, module, rows, self.counts)
        except KeyError:
            raise InvalidInputError(
                f"{self.path}: {module} is stored in llama.cpp's row order and the file does not say the "
                "head counts; pass --base (the base model folder) to read it"
            ) from None


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


def _expert_names(layout: GgufLayout, candidates: list[str], experts: int) -> list[str] | None:
    """Per-expert HF module names for a stacked tensor whose candidates name the stack (`….experts.w1`)."""
    for candidate in candidates:
        names = [re.sub(r"\.experts\.", f".experts.{e}.", candidate, count=1) for e in range(experts)]
        if expert_slot(layout, names[0]) is not None:
            return names
    return None


def _preferred(layout: GgufLayout, candidates: list[str]) -> str | None:
    """The candidate a row reordering of `layout` applies to (its rows must be restored), else the first."""
    projections = tuple(f".{r.projection}" for r in layout.rows)
    return next((c for c in candidates if projections and c.endswith(projections)), None) or next(
        iter(candidates), None
    )


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
    layout = layout_of_arch(arch)
    counts = {
        field_name: int(value)
        for field_name, key in (("heads", "head_count"), ("kv_heads", "head_count_kv"))
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
    entries, modules, alternatives = {}, [], {}
    for base, roles in pairs.items():
        if len(roles) != 2:
            raise CorruptFileError(path, f"{base} has {next(iter(roles))} but not its partner")
        stacked = len(roles["lora_a"].data.shape) == 3
        experts = int(roles["lora_a"].data.shape[0]) if stacked else 0
        names = recorded.get(base)
        if names is None and stacked:
            names = _expert_names(layout, candidates.get(base, []), experts)
        elif names is None:
            names = _preferred(layout, candidates.get(base, []))
            alternatives[names] = candidates.get(base, [])
        if names is None:
            unknown.extend(f"{base}.{r}" for r in roles)
            continue
        if stacked:
            modules += [_gguf_module(path, base, n, roles, heads, alpha, entries, e) for e, n in enumerate(names)]
        else:
            modules.append(_gguf_module(path, base, names, roles, heads, alpha, entries))
    metadata = {"general.architecture": str(arch_name), "adapter.lora.alpha": f"{alpha:g}"}
    weights = DerivedCheckpoint.build(path, path, entries, metadata)
    modules.sort(key=lambda m: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", m.name)])
    config = {"gguf_heads": heads, "gguf_alternatives": alternatives}
    tokens = _field(reader, gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS)
    if tokens:  # an activated LoRA: merge refuses it, as for PEFT's
        config[ALORA_TOKENS] = [int(t) for t in tokens]
    return Adapter(path, "gguf", modules, [], unknown, weights, config=config)


def _gguf_module(path, base, name, roles, heads: _Heads, alpha, entries, expert: int | None = None) -> LoraModule:
    a_tensor, b_tensor = roles["lora_a"], roles["lora_b"]
    a_shape, b_shape = tuple(int(d) for d in a_tensor.data.shape), tuple(int(d) for d in b_tensor.data.shape)
    if expert is not None:
        a_shape, b_shape = a_shape[1:], b_shape[1:]
    embedding = base.startswith("token_embd.")
    if embedding:
        a_shape = a_shape[::-1]
    rank = a_shape[0]
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != rank:
        raise CorruptFileError(path, f"{base}: lora_a {list(a_shape)} and lora_b {list(b_shape)} do not share a rank")
    a_dtype, load_a = _torch_of(a_tensor, path)
    b_dtype, load_b = _torch_of(b_tensor, path)

    def read_a():
        a = load_a() if expert is None else load_a()[expert]
        return a.T if embedding else a

    def read_b():
        b = load_b() if expert is None else load_b()[expert]
        return restore_rows(b, heads.order(name, b.shape[0]))

    suffix = "" if expert is None else f".{expert}"
    entries[f"{base}.lora_a{suffix}"] = (a_dtype, a_shape, read_a)
    entries[f"{base}.lora_b{suffix}"] = (b_dtype, b_shape, read_b)
    return LoraModule(
        name=name,
        kind="embedding" if embedding else "linear",
        a_key=f"{base}.lora_a{suffix}",
        b_key=f"{base}.lora_b{suffix}",
        a_shape=a_shape,
        b_shape=b_shape,
        rank=rank,
        alpha=alpha,
        scale=alpha / rank if alpha else 1.0,  # llama.cpp: alpha 0 means scale 1
    )


def bind_base_config(adapter: Adapter, config: dict | None, weight_names: set[str] | None = None) -> Adapter:
    """Give a GGUF adapter the base's head counts when its file does not record them, and, when the base's
    weight names are known, the HF module names of that base where gguf-py offers several (a file llama.cpp
    wrote names only GGUF tensors)."""
    if adapter.format != "gguf":
        return adapter
    heads = adapter.config.get("gguf_heads")
    if heads is not None and config:
        for key, value in head_counts(heads.layout, config).items():
            heads.counts.setdefault(key, value)
    alternatives = adapter.config.get("gguf_alternatives") or {}
    if weight_names:
        memory, stored = _module_names(weight_names, config)
        for i, module in enumerate(adapter.modules):
            options = alternatives.get(module.name, [])
            found = next((c for c in options if c in memory), None) or next((c for c in options if c in stored), None)
            if module.name not in memory and found is not None:
                adapter.modules[i] = replace(module, name=found)
    return adapter


def _module_names(weight_names: set[str], config: dict | None) -> tuple[set[str], set[str]]:
    """The base's module paths as PEFT names them (transformers' in-memory spelling), and as stored."""
    stored = {n.removesuffix(".weight") for n in weight_names if n.endswith(".weight")}
    layout = transformers_layout(config)[1]
    return {to_memory_path(n, layout) for n in stored}, stored
