"""`merge` and `unmerge`: one set of options, one runner, the same report."""

from __future__ import annotations

import click

from .ci.outcome import warning
from .console import byte_progress
from .help import GroupedCommand
from .options import merge_options
from .render.reports import print_json, render_merge
from .running import before_computing, pop_push_settings, publish

__all__ = ["merge", "unmerge"]


def _run_merge(operation: str, base: str, adapters: tuple[str, ...], options: dict) -> None:
    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    before_computing(quiet, load_torch=not options["dry_run"])
    push_settings = pop_push_settings(options)
    if push_settings["push_to_hub"] and options["dry_run"]:
        raise click.UsageError("--dry-run writes nothing, so there is nothing to --push-to-hub")
    if operation == "merge":
        from ..commands.merge import merge as run
    else:
        from ..commands.unmerge import unmerge as run
    output = options.pop("output")
    with byte_progress(quiet or options["dry_run"], operation) as progress:
        report = run(base, list(adapters), output, progress=progress, **options)
    for message in report.warnings:
        warning(message)
    pushed = publish(output, push_settings, options["token"], as_json)
    if as_json:
        print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    render_merge(report, operation)


@click.command(cls=GroupedCommand)
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@merge_options
def merge(base: str, adapters: tuple[str, ...], **options) -> None:
    """Merge ADAPTERS into BASE: W' = W + Σ wᵢ·ΔWᵢ, written to --output.

    BASE is a model folder or weights file; each ADAPTER a PEFT folder or
    adapter file. Arithmetic is fp32 with one rounding to the output dtype.
    """
    _run_merge("merge", base, adapters, options)


@click.command(cls=GroupedCommand)
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@merge_options
def unmerge(merged: str, adapters: tuple[str, ...], **options) -> None:
    """Remove ADAPTERS from MERGED: W = W' − Σ wᵢ·ΔWᵢ, written to --output.

    DoRA is undone exactly only for folders merged by loratool (they keep
    loratool_merge.json with the norms).
    """
    _run_merge("unmerge", merged, adapters, options)
