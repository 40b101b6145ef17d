"""`check --for ENGINE`: every reason a serving engine would reject an adapter or ignore part of it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidInputError
from .rules import ENGINES, RULES, Facts

__all__ = ["Finding", "CheckReport", "check", "report_lines"]


@dataclass(frozen=True)
class Finding:
    rule: str
    effect: str  # "rejects" | "ignores"
    problem: str
    fix: str
    items: list[str]


@dataclass(frozen=True)
class CheckReport:
    adapter: str
    engine: str
    checked_against: str
    max_lora_rank: int | None
    base: str | None
    findings: list[Finding]
    notes: list[str]

    @property
    def ready(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict:
        return {**asdict(self), "ready": self.ready}


def _base_facts(base: Path | None) -> tuple[dict | None, dict | None, list[str]]:
    """(tensors, config, notes) of the base: a checkpoint folder, or a folder with only config.json."""
    if base is None:
        return None, None, ["no --base given: targets were not matched against the base model"]
    from ..io.checkpoint import open_checkpoint, read_json

    config_file = base / "config.json" if base.is_dir() else None
    config = read_json(config_file, "config.json") if config_file is not None and config_file.is_file() else None
    has_weights = base.is_file() or any(base.glob("*.safetensors")) or any(base.glob("*.bin"))
    if not has_weights:
        return None, config, [f"{base} holds no weights: targets were not matched against module names"]
    checkpoint = open_checkpoint(base)
    return checkpoint.tensors, checkpoint.config or config, []


def check(
    adapter: str | os.PathLike,
    *,
    engine: str,
    base: str | os.PathLike | None = None,
    max_lora_rank: int | None = None,
    alpha: float | None = None,
) -> CheckReport:
    """List what `engine` would reject or silently ignore in `adapter`.

    Args:
        adapter: any readable adapter (PEFT, GGUF, mlx-lm, kohya, ...).
        engine: "vllm", "sglang", "llama.cpp" or "mlx".
        base: the base model folder (weights optional; config.json is enough for the GGUF rules).
        max_lora_rank: the server's limit; default the engine's documented default.

    Returns:
        A `CheckReport`; `ready` is True when nothing was found.
    """
    from ..adapters.reading import read_adapter
    from . import fit_to_base

    if engine not in ENGINES:
        raise InvalidInputError(f"--for must be one of {', '.join(ENGINES)}, got {engine!r}")
    if max_lora_rank is not None and max_lora_rank <= 0:
        raise InvalidInputError(f"--max-lora-rank must be a positive integer, got {max_lora_rank}")
    settings = ENGINES[engine]
    base_path = Path(base) if base is not None else None
    if base_path is not None and not base_path.exists():
        raise InvalidInputError(f"{base_path}: no such file or folder")
    source = fit_to_base(read_adapter(adapter, alpha=alpha), base_path)
    tensors, config, notes = _base_facts(base_path)
    limit = max_lora_rank if max_lora_rank is not None else settings.default_max_rank
    facts = Facts(source, settings, limit, tensors, config)
    findings = []
    for rule in RULES:
        effect = rule.effects.get(engine)
        if effect is None:
            continue
        items = rule.find(facts)
        if items:
            findings.append(Finding(rule.id, effect, rule.problem, rule.fix, items))
    return CheckReport(str(source.path), engine, settings.checked, limit, str(base) if base else None, findings, notes)


def report_lines(report: CheckReport) -> list[str]:
    """The report as plain lines for a terminal: one per finding, with what to do."""
    lines = [f"{report.adapter} for {report.engine} (rules checked against {report.checked_against}):"]
    for finding in report.findings:
        shown = ", ".join(finding.items[:6]) + (
            f", and {len(finding.items) - 6} more" if len(finding.items) > 6 else ""
        )
        lines.append(f"  {finding.effect}: {finding.problem}: {shown}")
        lines.append(f"    fix: {finding.fix}")
    lines += [f"  note: {note}" for note in report.notes]
    if report.ready:
        lines.append(f"  ready: nothing {report.engine} would reject or ignore")
    return lines
