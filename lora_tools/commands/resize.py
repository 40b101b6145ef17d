"""`resize`: an adapter's ΔW = s·B·A re-factorised to a new rank, exactly and without forming ΔW."""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from ..adapters.inits import refuse_rewritten_base
from ..adapters.model import Adapter, LoraModule
from ..adapters.peft import WEIGHTS_NAME, as_peft, peft_adapter_config, write_adapter_config
from ..adapters.registry import read_adapter
from ..adapters.report import ExtractReport, ModuleExtraction
from ..adapters.tuners import refuse_tuner
from ..compute.device import device_names, resolve_devices
from ..compute.executor import Executor, executor_for
from ..errors import UnsupportedError
from ..io.card import display_name, write_adapter_card
from ..io.hub import resolve_input
from ..io.output import atomic_output, checksums
from ..io.spool import Spool
from ..lowrank.rank import RankRule, choose_rank
from ..units import Progress

__all__ = ["resize"]


def resize(
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    max_rank: int | None = None,
    device: str = "auto",
    force: bool = False,
    checksum: bool = False,
    revision: str | None = None,
    token: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    executor: str | Executor = "local",
) -> ExtractReport:
    """Re-factorise an adapter's ΔW = s·B·A to a new rank, exactly and without forming ΔW.

    QR of B and of Aᵀ, then the SVD of the small r×r core, give ΔW's exact SVD;
    the rank rule picks k and the new balanced factors keep each module's scale
    (alpha is set to s·k, or s·√k for rsLoRA). Modules already at or below the new
    rank are re-balanced at their rank; DoRA magnitudes, lora_B.bias and
    modules_to_save are copied unchanged. `workers` modules are re-factorised at
    once (see `extract`); the output is byte-identical for any number, and with `executor="ray"`.
    """

    started = time.perf_counter()
    rule = RankRule(rank, energy, sv_ratio, max_rank)
    adapter_local, adapter_repo = resolve_input(adapter, revision=revision, token=token)
    source = as_peft(read_adapter(adapter_local))  # GGUF / mlx-lm adapters resize into PEFT folders too
    refuse_rewritten_base(source, "resize")  # PiSSA/OLoRA/…: W_res depends on the rank
    refuse_tuner(source, "resized")
    if source.format != "peft":
        raise UnsupportedError(f"{source.path}: resize writes PEFT folders; convert this {source.format} adapter first")
    devices = resolve_devices(device)
    output = Path(output)
    modules: list[ModuleExtraction] = []
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    parameters = full = 0
    handled: set[str] = set()

    with (
        atomic_output(output, is_dir=True, force=force, inputs=[source.path]) as target,
        executor_for(executor, devices, workers) as pool,
    ):
        spool = Spool(target / ".factors.spool")
        for number, (module, a, b, new_a, new_b, kept) in enumerate(
            pool.map(functools.partial(_resize_module, source, rule), source.modules, size=_module_bytes(source)), 1
        ):
            new_rank = new_a.shape[0]
            spool.add(module.a_key, new_a)
            spool.add(module.b_key, new_b)
            handled |= {module.a_key, module.b_key}
            ranks[module.name] = new_rank
            alphas[module.name] = module.scale * (new_rank**0.5 if source.use_rslora else new_rank)
            parameters += new_a.numel() + new_b.numel()
            full += a.numel() + b.numel()
            error = max(0.0, 1 - kept) ** 0.5
            modules.append(
                ModuleExtraction(module.name, new_rank, kept, error, "qr-svd", tuple(b.shape[:1]) + tuple(a.shape[1:]))
            )
            if progress is not None:
                progress(number, len(source.modules))
        for key in source.tensors:
            if key not in handled:
                spool.add(key, source.read(key))
        size = spool.finish(target / WEIGHTS_NAME)
        config = dict(source.config)
        config.update(
            peft_adapter_config(
                ranks,
                alphas,
                base_model=source.base_model,
                fan_in_fan_out=bool(source.config.get("fan_in_fan_out", False)),
                modules_to_save=list(source.config.get("modules_to_save") or []),
                use_rslora=source.use_rslora,
                extra={"use_dora": bool(source.config.get("use_dora", False))},
            )
        )
        write_adapter_config(target, config)
        name = display_name(adapter, adapter_repo)
        command = ["loratool", "resize", name, "--output", "OUTPUT", *rule.words()]
        write_adapter_card(target, source.base_model, f"{name} resized", modules, command)
        digests = checksums(target) if checksum else None
    return ExtractReport(
        operation="resize",
        output=str(output),
        device=device_names(devices),
        modules=modules,
        skipped=[],
        unchanged=[],
        changed_1d=[],
        modules_to_save=list(source.config.get("modules_to_save") or []),
        parameters=parameters,
        bytes=size,
        full_delta_parameters=full,
        seconds=time.perf_counter() - started,
        checksums=digests,
        executor=pool.name,
        nodes=pool.nodes,
    )


def _module_bytes(source: Adapter):
    """A module's stored bytes (its factors), to size the executor's tasks."""
    return lambda module: sum(source.tensors[key].nbytes for key in (module.a_key, module.b_key))


def _resize_module(source: Adapter, rule: RankRule, module: LoraModule, workspace):
    """The exact re-factorisation of one module (runs on a worker thread), in fp64.

    Returns (module, A, B, new A, new B, fraction of ‖ΔW‖² kept).
    """
    import torch

    a = source.read(module.a_key).to(workspace.device, torch.float64)
    b = source.read(module.b_key).to(workspace.device, torch.float64)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    q_b, r_b = torch.linalg.qr(b2)
    q_a, r_a = torch.linalg.qr(a2.T)
    core_u, values, core_vh = torch.linalg.svd(r_b @ r_a.T)
    total = float(values.pow(2).sum())
    new_rank = max(1, choose_rank(values.tolist(), total, rule, module.rank))
    root = values[:new_rank].sqrt()
    new_b = (q_b @ core_u[:, :new_rank]) * root
    new_a = root[:, None] * (core_vh[:new_rank] @ q_a.T)
    new_b = new_b.reshape(b.shape[0], new_rank, *b.shape[2:]).to(torch.float32).cpu()
    new_a = new_a.reshape(new_rank, *a.shape[1:]).to(torch.float32).cpu()
    kept = float(values[:new_rank].pow(2).sum()) / total if total else 1.0
    return module, a, b, new_a, new_b, kept
