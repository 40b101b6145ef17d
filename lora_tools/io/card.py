"""Model cards (README.md with YAML front matter) written beside every folder output.

Cards name inputs by repo id or folder name — never host paths or tokens — so
identical runs write identical cards.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..version import __version__

__all__ = ["display_name", "write_card", "write_adapter_card", "CARD_NAME"]

CARD_NAME = "README.md"


def display_name(spec: str, repo_id: str | None) -> str:
    """How a card names an input: its repo id, else its file or folder name."""
    return repo_id or Path(str(spec)).name


def _command(words: Sequence[str]) -> str:
    return " ".join(w if w and all(c.isalnum() or c in "-_./@=:" for c in w) else json.dumps(w) for w in words)


def write_card(
    folder: Path,
    *,
    base_model: str | None,
    library_name: str,
    tags: Sequence[str],
    title: str,
    summary: str,
    table: tuple[Sequence[str], Sequence[Sequence[str]]] | None,
    command: Sequence[str],
) -> None:
    """Write `folder/README.md`: front matter (base_model, library_name, tags), a summary, a table, the command."""
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines.append(f"library_name: {library_name}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in tags]
    lines += ["---", "", f"# {title}", "", summary, ""]
    if table is not None:
        header, rows = table
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines += [
        f"Made with loratool {__version__}. To reproduce:",
        "",
        "```bash",
        _command(command),
        "```",
        "",
    ]
    (folder / CARD_NAME).write_text("\n".join(lines), encoding="utf-8")


def write_adapter_card(target: Path, base_model: str | None, summary: str, modules: list, command: list[str]) -> None:
    """The card of an extracted or resized PEFT adapter: modules by rank and the mean relative error."""
    ranks = Counter(m.rank for m in modules)
    mean_error = sum(m.relative_error for m in modules) / len(modules) if modules else 0.0
    write_card(
        target,
        base_model=base_model,
        library_name="peft",
        tags=["lora", "peft", "loratool"],
        title=summary,
        summary=f"{summary}: {len(modules)} modules, mean relative error {mean_error:.4g} (‖Δ − B·A‖ / ‖Δ‖).",
        table=(["rank", "modules"], [[str(rank), str(count)] for rank, count in sorted(ranks.items())]),
        command=command,
    )
