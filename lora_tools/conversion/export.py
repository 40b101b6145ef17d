"""`convert --to gguf|mlx`: write an adapter in a serving engine's own format.

What the target cannot express (modules_to_save, DoRA magnitudes, lora_B biases,
LoHa/LoKr/Tucker variants) is refused naming it; with `drop_unsupported` the
representable part is written and the report's `skipped` lists what was left out.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..adapters import gguf, mlx
from ..adapters.inits import refuse_alora, refuse_rewritten_base
from ..adapters.model import Adapter, LoraModule
from ..adapters.peft import pattern_key
from ..adapters.registry import fit_to_base, read_adapter
from ..adapters.report import ExtractReport, ModuleExtraction
from ..adapters.tuners import refuse_tuner
from ..errors import InvalidInputError, UnsupportedError
from ..io.checkpoint import read_json
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums

__all__ = ["ExportOptions", "export"]


@dataclass(frozen=True)
class ExportOptions:
    to: str
    base: str | None = None
    alpha: float | None = None
    bake_alpha: bool = False
    drop_unsupported: bool = False
    force: bool = False
    checksum: bool = False
    revision: str | None = None
    token: str | None = None


def _unsupported(adapter: Adapter, to: str) -> tuple[list[LoraModule], list[dict]]:
    """The modules `to` can carry, and {name, reason} for each thing it cannot."""
    dropped = [{"name": r.target, "reason": f"{r.origin} (whole-tensor replacement)"} for r in adapter.replacements]
    dropped += [{"name": key, "reason": "not a LoRA tensor lora_tools understands"} for key in adapter.unknown_keys]
    kept = []
    for module in adapter.modules:
        why = None
        if module.variant != "lora":
            why = f"{module.variant} module (re-factorise first: loratool convert --to peft --rank N)"
        elif module.kind == "conv" or module.fan_in_fan_out:
            why = f"{'conv' if module.kind == 'conv' else 'Conv1D (fan_in_fan_out)'} layer"
        if why is not None:
            dropped.append({"name": module.name, "reason": why})
            continue
        # parts of a module: without them the rest is a different (plain LoRA) adapter, so they are named too
        if module.dora and to == "gguf":
            dropped.append({"name": module.name, "reason": "DoRA magnitude vector (the rest serves as plain LoRA)"})
            module = replace(module, magnitude_key=None)
        if module.bias_key is not None:
            dropped.append({"name": module.name, "reason": "lora_B bias"})
            module = replace(module, bias_key=None)
        kept.append(module)
    return kept, dropped


def _base_config(base: Path | None, to: str) -> dict | None:
    if base is None:
        if to == "gguf":
            raise InvalidInputError(
                "--to gguf needs --base: a folder with the base model's config.json (its weights are not needed)"
            )
        return None
    config = base / "config.json" if base.is_dir() else base
    if not config.is_file():
        raise InvalidInputError(f"{base}: no config.json there; --base must name the base model's folder")
    return read_json(config, "config.json")


def _expert_scale(adapter: Adapter):
    """PEFT's scale of a LoRA on a fused expert parameter: its alpha (alpha_pattern by parameter) over r (or √r)."""
    patterns = adapter.config.get("alpha_pattern") or {}

    def scale(parameter: str, rank: int) -> float:
        key = pattern_key(patterns, re.sub(r"(\.base_layer)+\.", ".", parameter))
        alpha = float(patterns[key] if key is not None else adapter.config.get("lora_alpha", 8))
        return alpha / math.sqrt(rank) if adapter.use_rslora else alpha / rank

    return scale


def export(adapter: str, output: str, options: ExportOptions) -> ExtractReport:
    """Convert `adapter` to a GGUF LoRA file or an mlx-lm adapter folder.

    Raises:
        UnsupportedError: the adapter holds something the target cannot carry (names it), unless
            `drop_unsupported`.
        EnvironmentProblem: `gguf` is not installed (for GGUF).
    """
    started = time.perf_counter()
    output_path = Path(output)
    if options.to == "gguf" and output_path.suffix != ".gguf":
        raise InvalidInputError(f"GGUF adapters are single files: give an --output ending in .gguf, not {output}")
    if options.to == "mlx":
        mlx.check_mlx_output(output_path)
    adapter_local, _ = resolve_input(adapter, revision=options.revision, token=options.token)
    base_local = (
        resolve_input(options.base, revision=options.revision, token=options.token)[0] if options.base else None
    )
    config = _base_config(base_local, options.to)
    source = read_adapter(adapter_local, alpha=options.alpha)
    refuse_rewritten_base(source, f"convert to {options.to}")  # PiSSA/OLoRA/…: would mean W + s·B·A
    refuse_tuner(source, f"written as {options.to}")
    if options.to == "mlx":
        refuse_alora(source, "mlx")
    if source.format == "gguf":
        fit_to_base(source, base_local)  # the base's own module names, when its weights are there
        gguf.bind_base_config(source, config)  # head counts, also from a lone config.json
    modules, dropped = _unsupported(source, options.to)
    lines = [f"{item['name']}: {item['reason']}" for item in dropped]
    if dropped and not options.drop_unsupported:
        raise UnsupportedError(
            f"{source.path}: {options.to} cannot carry {'; '.join(lines[:4])}"
            + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
            + " — merge the adapter instead, or pass --drop-unsupported to leave these out"
        )
    if not modules:
        raise InvalidInputError(f"{source.path}: nothing left to convert to {options.to}")
    inputs = [source.path] + ([base_local] if base_local is not None else [])
    with atomic_output(output_path, is_dir=options.to == "mlx", force=options.force, inputs=inputs) as target:
        if options.to == "gguf":
            plan = gguf.plan_gguf(modules, config, base_local, _expert_scale(source))
            size = gguf.write_gguf(source, modules, plan, target)
            notes = plan.notes
        else:
            size, notes = mlx.write_mlx(source, modules, target, config, bake_alpha=options.bake_alpha)
        digests = checksums(target) if options.checksum else None
        if digests is not None and options.to == "gguf":
            digests = {output_path.name: digests[target.name]}
    extracted = [
        ModuleExtraction(m.name, m.rank, 1.0, 0.0, "copied", tuple(m.b_shape[:1]) + tuple(m.a_shape[1:]))
        for m in modules
    ]
    return ExtractReport(
        operation=f"convert to {options.to}",
        output=str(output_path),
        device="cpu",
        modules=extracted,
        skipped=dropped,
        unchanged=[],
        changed_1d=[],
        modules_to_save=[],
        parameters=sum(m.rank * (m.b_shape[0] + m.a_shape[-1]) for m in modules),
        bytes=size,
        full_delta_parameters=source.num_parameters,
        seconds=time.perf_counter() - started,
        notes=notes + [f"left out: {line}" for line in lines],
        checksums=digests,
    )
