"""`convert`: an adapter between PEFT, kohya, GGUF (llama.cpp), mlx-lm and diffusers formats.

PEFT ↔ kohya re-spells LoRA factors bit for bit and re-factorises LoHa / LoKr /
Tucker to a rank (`conversion.spelling`); `--to gguf|mlx` writes a serving engine's
own format (`conversion.export`); `--naming` and `--to diffusers` rename a diffusion
LoRA between diffusers and the original single-file names (`conversion.naming`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..adapters.inits import ALORA_TOKENS, invocation_tokens, refuse_alora, refuse_rewritten_base
from ..adapters.kohya import kohya_metadata
from ..adapters.model import Adapter
from ..adapters.peft import WEIGHTS_NAME, peft_adapter_config, write_adapter_config
from ..adapters.registry import fit_to_base, read_adapter
from ..adapters.report import ExtractReport, ModuleExtraction
from ..adapters.tuners import needs_lora_first, refuse_tuner
from ..conversion.export import ExportOptions, export
from ..conversion.naming import convert_naming
from ..conversion.spelling import component_of, parameter_count, refuse_extras, to_kohya, to_peft
from ..errors import InvalidInputError, LoraToolError
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..io.spool import Spool
from ..lowrank.rank import RankRule

__all__ = ["convert", "TARGET_FORMATS"]

TARGET_FORMATS = ("peft", "kohya", "gguf", "mlx", "diffusers")


def convert(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str,
    base: str | os.PathLike | None = None,
    component: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    bake_alpha: bool = False,
    alpha: float | None = None,
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    drop_unsupported: bool = False,
    workers: int | None = None,
    naming: str | None = None,
) -> ExtractReport:
    """Convert an adapter between PEFT and kohya spellings.

    Args:
        adapter: any readable adapter (PEFT, kohya, LyCORIS, diffusers).
        output: a PEFT folder (`to="peft"`) or a `.safetensors` file (`to="kohya"`).
        base: needed to turn kohya's underscored names into PEFT's dotted ones.
        component: which pipeline component to take (or to name, for kohya output).
        rank: LoHa / LoKr / Tucker modules (and PEFT tuners other than AdaLoRA and VeRA) are re-factorised
            to this rank (an approximation).
        energy: instead of `rank`, each module's rank keeps this fraction of ‖ΔW‖² (as `resize --energy`).
        bake_alpha: fold the scale into B and set alpha = rank, instead of carrying alpha.
        drop_unsupported: for `to="gguf"|"mlx"`, leave out (and report) what the target cannot carry.
        workers: modules re-factorised at once, one core each (default: the usable cores);
            the output is byte-identical for any number.
        naming: for diffusion models, "diffusers" or "original" (LDM / BFL / SD3) module names; fused and
            split projections are converted exactly (see `renaming`). `to="diffusers"` writes a diffusers
            LoRA file (`transformer.….lora_A.weight`, scale folded into B) and defaults to "diffusers".

    Returns:
        An `ExtractReport` listing each module, how it was carried, and any approximation error.
    """
    started = time.perf_counter()
    if to not in TARGET_FORMATS:
        raise InvalidInputError(f"--to must be one of {', '.join(TARGET_FORMATS)}, got {to!r}")
    if rank is not None and rank <= 0:
        raise InvalidInputError(f"--rank must be a positive integer, got {rank}")
    rule = RankRule(rank=rank, energy=energy) if rank is not None or energy is not None else None
    if naming is not None or to == "diffusers":
        return convert_naming(adapter, output, to=to, naming=naming or "diffusers", base=base, alpha=alpha,
                              force=force, checksum=checksum, revision=revision, token=token)  # fmt: skip
    if to in ("kohya", "gguf", "mlx"):  # resolved once: the steps below read the local copy
        adapter = resolve_input(adapter, revision=revision, token=token)[0]
    if to in ("kohya", "gguf", "mlx") and needs_lora_first(read_adapter(adapter, alpha=alpha)):

        def then(lora: Path) -> ExtractReport:
            return convert(lora, output, to=to, base=base, component=component, bake_alpha=bake_alpha, force=force,
                           checksum=checksum, progress=progress, drop_unsupported=drop_unsupported)  # fmt: skip

        first = {"base": base, "rank": rank, "energy": energy, "revision": revision, "token": token, "workers": workers}
        return _through_lora(adapter, output, first, then)
    if to in ("gguf", "mlx"):
        options = ExportOptions(to, base, alpha, bake_alpha, drop_unsupported, force, checksum, revision, token)
        return export(adapter, output, options)
    output = Path(output)
    if to == "kohya" and output.suffix != ".safetensors":
        raise InvalidInputError(
            f"kohya adapters are single files: give an --output ending in .safetensors, not {output}"
        )
    adapter_local, _ = resolve_input(adapter, revision=revision, token=token)
    base_local = resolve_input(base, revision=revision, token=token)[0] if base is not None else None
    source = _readable_source(read_adapter(adapter_local, alpha=alpha), base_local, to)
    chosen = component_of(source, component)
    if len({m.component for m in source.modules}) > 1:
        source = source.restricted(chosen)
    modules: list[ModuleExtraction] = []
    inputs = [source.path] + ([base_local] if base_local is not None else [])
    with atomic_output(output, is_dir=to == "peft", force=force, inputs=inputs) as target:
        size = _respell(source, target, to, chosen, base_local, rule, bake_alpha, workers, modules)
        digests = checksums(target) if checksum else None
        if digests is not None and to == "kohya":
            digests = {output.name: digests[target.name]}
    if progress is not None:
        progress(len(modules), len(modules))
    return ExtractReport(
        operation=f"convert to {to}",
        output=str(output),
        device="cpu",
        modules=modules,
        skipped=[],
        unchanged=[],
        changed_1d=[],
        modules_to_save=[],
        parameters=sum(parameter_count(m) for m in modules),
        bytes=size,
        full_delta_parameters=source.num_parameters,
        seconds=time.perf_counter() - started,
        notes=[
            f"{m.name}: re-factorised as rank-{m.rank} LoRA, an approximation (relative error {m.relative_error:.3g})"
            for m in modules
            if m.method.startswith("re-")
        ],
        checksums=digests,
    )


def _readable_source(source: Adapter, base_local: Path | None, to: str) -> Adapter:
    """The adapter fitted to its base, or the reason it cannot be written as `to` (PEFT or kohya)."""
    source = fit_to_base(source, base_local)
    refuse_rewritten_base(source, f"convert to {to}")  # PiSSA/OLoRA/…: a plain LoRA would mean W + s·B·A
    if source.unknown_keys:
        raise InvalidInputError(
            f"{source.path}: keys lora_tools does not understand: {', '.join(source.unknown_keys[:5])}"
        )
    if to == "kohya":
        refuse_tuner(source, "written as kohya")
        refuse_alora(source, "kohya")
    refuse_extras(source, to)
    return source


def _respell(source: Adapter, target: Path, to: str, chosen, base_local, rule, bake_alpha, workers, modules) -> int:
    """Write `source`'s modules into `target` as a kohya file or a PEFT folder (config included), appending
    each module's `ModuleExtraction` to `modules`; return the weights' size in bytes."""
    scratch = target / ".factors.spool" if to == "peft" else target.parent / f".{target.name}.spool"
    spool = Spool(scratch)
    try:
        if to == "kohya":
            to_kohya(source, chosen, spool, bake_alpha, modules)
            return spool.finish(target, metadata=kohya_metadata(source, [m.rank for m in modules]))
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        fan_in_fan_out, use_dora = to_peft(
            source, base_local, chosen, spool, rule, bake_alpha, modules, ranks, alphas, workers
        )
        size = spool.finish(target / WEIGHTS_NAME)
        config = peft_adapter_config(
            ranks, alphas, base_model=source.base_model, fan_in_fan_out=fan_in_fan_out, modules_to_save=[],
            extra={"use_dora": use_dora, **_alora_fields(source.config)},
        )  # fmt: skip
        write_adapter_config(target, config)
        return size
    finally:
        scratch.unlink(missing_ok=True)


def _alora_fields(config: dict) -> dict:
    """An activated LoRA's invocation tokens, kept in the PEFT config written (without them it acts on every token)."""
    tokens = invocation_tokens(config)
    return {} if tokens is None else {ALORA_TOKENS: tokens}


def _through_lora(adapter, output, first: dict, then: Callable[[Path], ExtractReport]) -> ExtractReport:
    """A PEFT tuner written as kohya, GGUF or mlx-lm: the LoRA `convert --to peft` makes of it (exact for
    AdaLoRA and VeRA, the best rank-k of ΔW for the others), then that LoRA in the target format.

    The intermediate PEFT folder lives in a scratch folder beside the output, removed either way; the
    report lists the modules as the first step carried them (method, rank, relative error).
    """
    started = time.perf_counter()
    parent = Path(output).parent
    with tempfile.TemporaryDirectory(dir=parent if parent.is_dir() else None, prefix=".loratool-lora-") as scratch:
        lora = convert(adapter, Path(scratch) / "lora", to="peft", **first)
        try:
            written = then(Path(scratch) / "lora")
        except LoraToolError as exc:  # name the user's adapter, not the scratch folder
            exc.args = tuple(str(a).replace(str(Path(scratch) / "lora"), f"{adapter} (as a LoRA)") for a in exc.args)
            raise
    return replace(
        written, modules=lora.modules, notes=lora.notes + written.notes, seconds=time.perf_counter() - started
    )
