"""What one run of a command produced, and the CI outputs written from it when it ends.

The commands record here the report they rendered (its JSON form), and every `error:` and
`warning:` they print goes through `error` / `warning`. When the command ends, however it ends,
`ci_outputs` writes what was asked for: the JUnit XML file of `--junit-xml`, and inside GitHub
Actions the job summary (the annotations were written as the messages were printed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import click

from ...errors import EXIT_ENVIRONMENT, LoraToolError
from . import github

__all__ = [
    "Outcome",
    "current",
    "record_report",
    "error",
    "warning",
    "annotate",
    "annotate_findings",
    "set_junit_path",
    "ci_outputs",
    "ARGUMENTS_KEY",
]

#: Where a command's parsed arguments are kept in Click's shared `ctx.meta` (see help.GroupedCommand.invoke).
ARGUMENTS_KEY = "lora_tools.arguments"
#: The arguments naming the input an annotation without a file of its own points at, by preference.
_INPUT_ARGUMENTS = ("adapter", "path", "adapters")


@dataclass
class Outcome:
    """The report, errors, problems and warnings of the running command."""

    command: str = ""
    report: dict | None = None
    errors: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    junit_path: str | None = None
    arguments: Mapping = field(default_factory=dict)


_CURRENT = [Outcome()]


def current() -> Outcome:
    return _CURRENT[0]


def record_report(data: Mapping, key: str | None = None) -> None:
    """Keep the report's JSON form; with `key`, as a part of the report already kept (inspect's `check`)."""
    outcome = current()
    if key is not None and outcome.report is not None:
        outcome.report = {**outcome.report, key: dict(data)}
    else:
        outcome.report = dict(data)


def _input_file(outcome: Outcome) -> str | None:
    for name in _INPUT_ARGUMENTS:
        value = outcome.arguments.get(name)
        if isinstance(value, tuple | list):
            value = value[0] if value else None
        if value and os.path.exists(str(value)):
            return str(value)
    return None


def error(message: str, *, file: str | None = None, problems: Sequence[str] = ()) -> None:
    """Print `error: message` on stderr (and annotate it inside Actions); keep it for the summary and JUnit.

    Called while an error is being handled (`running.fail` in app.py's handlers), the file and the
    problems default to that error's `path` and `problems`.
    """
    handled = sys.exc_info()[1]
    if isinstance(handled, LoraToolError):
        file = file or getattr(handled, "path", None)
        problems = problems or getattr(handled, "problems", ())
    outcome = current()
    click.echo(f"error: {message}", err=True)
    outcome.errors.append(message)
    outcome.problems += list(problems)
    title = f"loratool {outcome.command}".strip()
    github.annotate("error", message, title=title, file=file or _input_file(outcome))


def warning(message: str, *, file: str | None = None, level: str = "warning", show: bool = True) -> None:
    """Print `warning: message` on stderr (unless `show` is False) and annotate it inside Actions."""
    outcome = current()
    if show:
        from ..console import stderr_console

        stderr_console().print(f"[yellow]warning:[/yellow] {message}", markup=True)
    outcome.warnings.append(message)
    github.annotate(level, message, title=f"loratool {outcome.command}".strip(), file=file or _input_file(outcome))


def annotate(level: str, message: str, *, file: str | None = None, title: str | None = None) -> None:
    """Inside Actions, annotate a problem printed in another form than `error:` (a ✗ line of a report)."""
    github.annotate(level, message, title=title or f"loratool {current().command}".strip(), file=file)


def annotate_findings(report) -> None:
    """Inside Actions, one annotation per `check` finding: an error for what the engine rejects, else a warning."""
    for finding in report.findings:
        shown = ", ".join(finding.items[:20]) + (
            f" and {len(finding.items) - 20} more" if len(finding.items) > 20 else ""
        )
        github.annotate(
            "error" if finding.effect == "rejects" else "warning",
            f"{report.engine} {finding.effect}: {finding.problem}: {shown} (fix: {finding.fix})",
            title=f"loratool check: {finding.rule}",
            file=report.adapter,
        )


def set_junit_path(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """Callback of `--junit-xml`: where to write the JUnit report when the command ends."""
    current().junit_path = value


def _exit_code(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):
        return 1
    return 1


def _rules(report: Mapping | None) -> list[str]:
    """The ids of the serving rules a `check` report was checked against (each is a testcase)."""
    check = (report or {}).get("check", report) or {}
    if "findings" not in check:
        return []
    from ...serving.rules import RULES

    return [rule.id for rule in RULES if check.get("engine") in rule.effects]


def _write_text(path: str, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it into place: a reader never sees half a report."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write_junit(outcome: Outcome) -> None:
    from .junit import junit_xml

    report = outcome.report
    if report is not None and "findings" not in report and isinstance(report.get("check"), Mapping):
        report = {**report, "findings": report["check"]["findings"], "engine": report["check"]["engine"]}
    document = junit_xml(
        outcome.command, report, outcome.problems, outcome.errors,
        rules=_rules(outcome.report), warnings=outcome.warnings,
    )  # fmt: skip
    _write_text(outcome.junit_path, document)


def _finish(outcome: Outcome, code: int) -> int:
    """Write the CI outputs; return the exit code, made 4 when the JUnit file cannot be written."""
    if outcome.junit_path:
        try:
            _write_junit(outcome)
        except OSError as exc:
            error(f"{outcome.junit_path}: cannot write the JUnit report: {exc.strerror or exc}; choose another path")
            code = code or EXIT_ENVIRONMENT
    if outcome.report is not None or outcome.errors:
        markdown = github.summary_markdown(outcome.command, outcome.report, code, outcome.errors, outcome.warnings)
        try:
            github.append_summary(markdown)
        except OSError as exc:  # the job's summary is a report about the run, not its result: say so, go on
            warning(f"cannot append to GITHUB_STEP_SUMMARY: {exc.strerror or exc}")
    return code


@contextmanager
def ci_outputs(ctx: click.Context) -> Iterator[Outcome]:
    """Around one command: start a fresh outcome, and write the CI outputs when it ends, however it ends."""
    arguments = ctx.meta.setdefault(ARGUMENTS_KEY, {})
    arguments.clear()
    words = [*getattr(ctx, "_protected_args", ()), *ctx.args]  # the command line after the group's options
    outcome = _CURRENT[0] = Outcome(command=words[0] if words else "", arguments=arguments)
    failure: BaseException | None = None
    try:
        yield outcome
    except click.ClickException as exc:  # a usage error: click prints it; annotate it too
        outcome.errors.append(exc.format_message())
        github.annotate("error", exc.format_message(), title=f"loratool {outcome.command}".strip())
        failure = exc
        raise
    except BaseException as exc:
        failure = exc
        raise
    finally:
        code = _exit_code(failure)
        if _finish(outcome, code) != code:
            ctx.exit(EXIT_ENVIRONMENT)  # replaces a success only: the report asked for is missing
