"""`convert --naming` on files: read the adapter and the base's shapes, write the renamed LoRA (kohya or diffusers).

The renaming itself (fused and split projections, exactly) is `layouts.renaming`'s plan.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..adapters import kohya
from ..adapters.inits import refuse_alora
from ..adapters.model import ModuleFactors
from ..adapters.registry import module_writer, read_adapter
from ..adapters.report import ExtractReport, ModuleExtraction
from ..errors import InvalidInputError, UnsupportedError
from ..io.checkpoint import open_checkpoint
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..io.spool import Spool
from ..layouts.diffusion import detect_layout
from ..layouts.renaming import NAMINGS, Target, fuse, link_spans, plan_renaming
from .spelling import parameter_count, refuse_extras

__all__ = ["convert_naming"]

#: kohya text-encoder prefixes per family (sd-scripts: Flux's T5 is `lora_te3`, SD3's CLIP-G `lora_te2`).
_TEXT_PREFIXES = {
    "text_encoder": "lora_te1",
    "text_encoder_2": "lora_te2",
    "text_encoder_3": "lora_te3",
}


def _kohya_prefix(family: str, component: str | None, naming: str) -> str:
    if component in ("unet", "transformer", None):
        return "lora_transformer" if naming == "diffusers" and component == "transformer" else "lora_unet"
    if family.startswith(("SD 1", "SD 2", "SD UNet")) and component == "text_encoder":
        return "lora_te"
    if family.startswith("Flux") and component == "text_encoder_2":
        return "lora_te3"
    return _TEXT_PREFIXES.get(component, f"lora_{component}")


def _denoiser_checkpoint(base: Path):
    if base.is_dir():
        base = next((base / sub for sub in ("transformer", "unet") if (base / sub).is_dir()), base)
    return base, open_checkpoint(base)


def _base_layout(base: Path):
    folder, checkpoint = _denoiser_checkpoint(base)
    layout = detect_layout(list(checkpoint.tensors))
    if layout is None or not any(link.component in ("unet", "transformer") for link in layout.links):
        raise InvalidInputError(
            f"{folder}: not a diffusion model lora_tools has name tables for (SD 1.x/2.x/SDXL UNet, Flux, SD3); "
            "--naming needs the single file or the diffusers folder of the adapter's base"
        )
    return layout, {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}


def _dotted_names(base: Path, layout, component: str) -> dict[str, str]:
    """underscored → dotted module paths of a text encoder, from the base folder or the single file's prefix."""
    prefix = dict(layout.prefixes).get(component)
    if base.is_dir() and (base / component).is_dir():
        names, prefix = list(open_checkpoint(base / component).tensors), ""
    elif prefix is not None and base.is_file():
        names = list(open_checkpoint(base).tensors)
    else:
        return {}
    paths = {n[len(prefix) : -len(".weight")] for n in names if n.startswith(prefix) and n.endswith(".weight")}
    paths |= {p.removeprefix("text_model.") for p in paths} | {
        f"text_model.{p}" for p in paths if not p.startswith("text_model.")
    }
    return {p.replace(".", "_"): p for p in paths}


def _write(spool, to: str, key: str, tensors: tuple, dora) -> None:
    down, up, alpha = tensors
    module_writer(to)(spool, ModuleFactors(key, down, up, alpha, dora))


def _key(target: Target, to: str, naming: str, family: str, dotted) -> str:
    if to == "kohya":
        return kohya.kohya_name(_kohya_prefix(family, target.component, naming), target.name)
    name = target.name
    module = target.parts[0].module
    if module.kohya_name and target.component not in ("unet", "transformer"):
        name = dotted(target.component).get(name)
        if name is None:
            raise InvalidInputError(
                f"{module.name} ({target.component}): kohya names are underscored; give a --base folder with "
                f"{target.component}/ so they can be spelled as dotted diffusers names"
            )
    component = target.component or ("unet" if family.startswith("SD") and "UNet" in family else "transformer")
    return f"{component}.{name}"


def convert_naming(
    adapter: str | os.PathLike, output: str | os.PathLike, *, to: str, naming: str,
    base: str | os.PathLike | None, alpha: float | None, force: bool, checksum: bool,
    revision: str | None, token: str | None,
):  # fmt: skip
    """Convert a diffusion LoRA between diffusers and original module names (see `renaming`); one .safetensors out."""
    started = time.perf_counter()
    if naming not in NAMINGS:
        raise InvalidInputError(f"--naming must be one of {', '.join(NAMINGS)}, got {naming!r}")
    if to not in ("kohya", "diffusers"):
        raise InvalidInputError(f"--naming writes kohya or diffusers LoRA files (--to kohya|diffusers), not --to {to}")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise InvalidInputError(f"{to} LoRAs are single files: give an --output ending in .safetensors, not {output}")
    if base is None:
        raise InvalidInputError(
            "--naming needs --base (the single file or diffusers folder of the model): its shapes say how fused rows divide"
        )
    adapter_local, _ = resolve_input(adapter, revision=revision, token=token)
    base_local = Path(resolve_input(base, revision=revision, token=token)[0])
    source = read_adapter(adapter_local, alpha=alpha)
    if source.unknown_keys:
        raise InvalidInputError(f"{source.path}: keys lora_tools does not understand: {', '.join(source.unknown_keys[:5])}")  # fmt: skip
    refuse_extras(source, to)
    refuse_alora(source, f"{to} with {naming} names")
    layout, shapes = _base_layout(base_local)
    targets = plan_renaming(source, layout, link_spans(layout, shapes), naming)
    dotted_cache: dict = {}

    def dotted(component):
        return dotted_cache.setdefault(component, _dotted_names(base_local, layout, component))

    modules, fused, empty = [], [], []
    with atomic_output(output, is_dir=False, force=force, inputs=[source.path, base_local]) as destination:
        spool = Spool(destination.parent / f".{destination.name}.spool")
        try:
            for target in targets:
                down, up, module_alpha, method = fuse(target, source.read)
                if not target.renamed_only and not up.any():  # a fused LoRA's rows for a part it never touched
                    empty.append(target.name)
                    continue
                module = target.parts[0].module
                dora = None
                if module.magnitude_key is not None:
                    if module.dora_axis != "out":
                        raise UnsupportedError(f"{module.name}: per-input DoRA scales cannot be converted")
                    dora = source.read(module.magnitude_key)
                key = _key(target, to, naming, layout.family, dotted)
                _write(spool, to, key, (down, up, module_alpha), dora)
                shape = (target.rows, *down.shape[1:])
                modules.append(ModuleExtraction(key, down.shape[0], 1.0, 0.0, method, shape))
                if "block-diagonal" in method:
                    fused.append(key)
            metadata = kohya.kohya_metadata(source, [m.rank for m in modules]) if to == "kohya" else {}
            size = spool.finish(destination, metadata=metadata)
        finally:
            spool.path.unlink(missing_ok=True)
        digests = checksums(destination) if checksum else None
        if digests is not None:
            digests = {output.name: digests[destination.name]}
    notes = [
        f"{name}: parts with different A's were fused block-diagonally, rank {m.rank} (the sum of theirs); "
        "ΔW is exact, the file is larger"
        for name, m in ((m.name, m) for m in modules)
        if name in fused
    ] + [f"{name}: the adapter's rows for it are all zero (ΔW = 0), so it is left out" for name in empty]
    return ExtractReport(
        operation=f"convert to {to} ({naming} names)", output=str(output), device="cpu", modules=modules,
        skipped=[], unchanged=[], changed_1d=[], modules_to_save=[], parameters=sum(parameter_count(m) for m in modules),
        bytes=size, full_delta_parameters=source.num_parameters, seconds=time.perf_counter() - started,
        notes=notes, checksums=digests, block_diagonal=fused,
    )  # fmt: skip
