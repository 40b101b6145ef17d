"""What `check --for ENGINE` reports: the findings of the serving rules, the report, its terminal lines."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .rules import RULES, Facts

__all__ = ["Finding", "CheckReport", "base_facts", "findings", "report_lines"]


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


def base_facts(base: Path | None) -> tuple[dict | None, dict | None, list[str]]:
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


def findings(facts: Facts, engine: str) -> list[Finding]:
    """Every rule that applies to `engine` and finds something in `facts`, in the rules' order."""
    found = []
    for rule in RULES:
        effect = rule.effects.get(engine)
        if effect is None:
            continue
        items = rule.find(facts)
        if items:
            found.append(Finding(rule.id, effect, rule.problem, rule.fix, items))
    return found


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
