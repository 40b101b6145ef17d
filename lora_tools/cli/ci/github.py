"""GitHub Actions' own formats: workflow commands (annotations) and the job summary's Markdown.

The runner reads workflow commands from a step's stdout and stderr alike (actions/runner:
`ScriptHandler` gives both streams an `OutputManager`), one per line, and splits a command at
`::`, its properties at `,` and `=`. So annotations go to stderr, where loratool's other
messages are, and stdout keeps only the data (`--json` stays one parseable object). Escaping
follows the runner's `ActionCommand`: in the message `%`, CR and LF; in a property value also
`:` and `,` (`%` first, so that an escape is never escaped twice).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path

__all__ = [
    "in_actions",
    "escape_data",
    "escape_property",
    "workflow_command",
    "annotation_file",
    "annotate",
    "summary_markdown",
    "append_summary",
]

#: (character, escape) in the order they are applied; `%` first.
_DATA_ESCAPES = (("%", "%25"), ("\r", "%0D"), ("\n", "%0A"))
_PROPERTY_ESCAPES = (*_DATA_ESCAPES, (":", "%3A"), (",", "%2C"))
#: Rows shown per table in the job summary (GitHub caps a step's summary at 1 MiB).
_SUMMARY_ROWS = 200


def in_actions(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a GitHub Actions job (the runner sets GITHUB_ACTIONS=true)."""
    return (os.environ if environ is None else environ).get("GITHUB_ACTIONS") == "true"


def _escape(text: str, table: tuple[tuple[str, str], ...]) -> str:
    for character, escape in table:
        text = text.replace(character, escape)
    return text


def escape_data(text: str) -> str:
    """A workflow command's message, escaped as the runner unescapes it."""
    return _escape(text, _DATA_ESCAPES)


def escape_property(text: str) -> str:
    """A workflow command's property value (title, file), escaped as the runner unescapes it."""
    return _escape(text, _PROPERTY_ESCAPES)


def workflow_command(command: str, message: str, **properties: str | None) -> str:
    """One line such as `::error file=a/b.json,title=T::message`; properties that are None are left out."""
    given = ",".join(f"{name}={escape_property(str(value))}" for name, value in properties.items() if value)
    return f"::{command}{' ' + given if given else ''}::{escape_data(message)}"


def annotation_file(path: str | os.PathLike | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The file an annotation points at: an adapter folder's config, relative to the workspace when inside it."""
    if path is None or not str(path):
        return None
    environ = os.environ if environ is None else environ
    target = Path(path)
    if not target.exists():  # a Hub repo id, or a path that is not there: nothing on the diff to point at
        return None
    if target.is_dir() and (target / "adapter_config.json").is_file():
        target = target / "adapter_config.json"
    workspace = environ.get("GITHUB_WORKSPACE")
    if workspace:
        try:
            return target.resolve().relative_to(Path(workspace).resolve()).as_posix()
        except ValueError:
            pass
    return target.as_posix()


def annotate(level: str, message: str, *, title: str, file: str | os.PathLike | None = None) -> None:
    """Inside Actions, write `message` as an `error`/`warning` workflow command on stderr; elsewhere nothing."""
    if not in_actions():
        return
    line = workflow_command(level, message, file=annotation_file(file), title=title)
    with suppress(OSError, ValueError):  # a closed stderr: the message itself could not be shown either
        print(line, file=sys.stderr, flush=True)


def _cell(value) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{key}: {item}" for key, item in value.items())
    elif isinstance(value, list):
        text = ", ".join(map(str, value))
    else:
        text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ").replace("<", "&lt;")


def _is_row(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


def _table(rows: list[dict]) -> list[str]:
    """A Markdown table of the rows' scalar columns (and short lists), at most `_SUMMARY_ROWS` rows."""
    columns = [key for key, value in rows[0].items() if not _is_row(value)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows[:_SUMMARY_ROWS]]
    if len(rows) > _SUMMARY_ROWS:
        lines.append(f"\n… and {len(rows) - _SUMMARY_ROWS} more (see the JSON report)")
    return lines


def _bullets(items: list) -> list[str]:
    lines = [f"- {_cell(item)}" for item in items[:_SUMMARY_ROWS]]
    return lines + ([f"- … and {len(items) - _SUMMARY_ROWS} more"] if len(items) > _SUMMARY_ROWS else [])


def _sections(report: Mapping) -> tuple[list[tuple[str, object]], list[str]]:
    """The report's scalar facts (for one table) and its lists and nested reports (as sections)."""
    facts, sections = [], []
    for key, value in report.items():
        if key == "schema":
            continue
        if _is_row(value):
            sections += ["", f"### {key} ({len(value)})", "", *_table(value)]
        elif isinstance(value, list) and value:
            sections += ["", f"### {key} ({len(value)})", "", *_bullets(value)]
        elif isinstance(value, dict) and any(_is_row(v) or isinstance(v, list | dict) for v in value.values()):
            inner_facts, inner = _sections(value)
            sections += ["", f"### {key}", ""]
            sections += [f"- {name}: {_cell(item)}" for name, item in inner_facts] + inner
        elif not isinstance(value, list):
            facts.append((key, value))
    return facts, sections


def summary_markdown(
    command: str, report: Mapping | None, exit_code: int, errors: list[str], warnings: list[str]
) -> str:
    """The job summary of one command: its status, errors and warnings, then the report's facts and tables.

    Pure over the report's JSON form, so every command's report (modules, validation problems,
    tensors changed, timings …) is shown the same way: scalars in one table, lists as tables.
    """
    status = "passed" if exit_code == 0 else f"failed (exit {exit_code})"
    lines = [f"## {'✅' if exit_code == 0 else '❌'} loratool {command}: {status}", ""]
    lines += [f"> **error:** {_cell(message)}" for message in errors]
    lines += [f"> **warning:** {_cell(message)}" for message in warnings]
    if report:
        facts, sections = _sections(report)
        if facts:
            lines += ["", "| field | value |", "|---|---|", *(f"| {key} | {_cell(value)} |" for key, value in facts)]
        lines += sections
    return "\n".join(lines) + "\n\n"


def append_summary(markdown: str, environ: Mapping[str, str] | None = None) -> None:
    """Append to the file named by GITHUB_STEP_SUMMARY, inside Actions and when it is set."""
    environ = os.environ if environ is None else environ
    path = environ.get("GITHUB_STEP_SUMMARY")
    if not path or not in_actions(environ):
        return
    with open(path, "a", encoding="utf-8") as summary:
        summary.write(markdown)
