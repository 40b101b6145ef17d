"""The commands that only read: `inspect`, `check`, `validate`, `diff`, `env`."""

from __future__ import annotations

import click

from ..errors import EXIT_INVALID
from .ci.outcome import annotate, annotate_findings, record_report
from .console import count_progress, stderr_console
from .help import GroupedCommand
from .options import engine_options, executor_option, hub_input_options, json_option, junit_option, plot_option
from .render.reports import print_json, render_adapter, render_checkpoint, render_environment
from .running import fail

__all__ = ["inspect", "check", "validate", "diff", "env"]


def _adapter_statistics(
    report, path: str, base: str | None, alpha: float | None, stats: bool, plot: str | None, hub: dict
):
    """inspect --stats (and --plot): the statistics of an adapter, drawn when asked."""
    from ..commands.inspect import AdapterReport

    if not (stats or plot):
        return None
    if not isinstance(report, AdapterReport):
        raise click.UsageError("--stats and --plot describe adapters; to compare checkpoints use `loratool diff`")
    from ..commands.stats import adapter_stats

    statistics = adapter_stats(path, base=base, alpha=alpha, **hub)
    if plot:
        from ..analysis.plot import plot_stats

        plot_stats(statistics, plot)
    return statistics


@click.command(cls=GroupedCommand)
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(), help="Validate the adapter against this base checkpoint.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not a grouped summary.")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@click.option(
    "--rename", "renames", multiple=True, metavar="REGEX=REPLACEMENT",
    help="Rename adapter module paths before matching them to the base (repeatable).",
)  # fmt: skip
@click.option("--stats", is_flag=True, help="Per-module ‖ΔW‖, σ₁, stable rank, ranks for 90/99 % energy, flags.")
@plot_option
@executor_option
@engine_options
@json_option
@junit_option
@hub_input_options
def inspect(
    path: str, base: str | None, show_all: bool, alpha: float | None, renames: tuple, stats: bool, plot: str | None,
    as_json: bool, engine: str | None, max_lora_rank: int | None, executor: str, **hub,
) -> None:  # fmt: skip
    """Describe an adapter or checkpoint at PATH (detected from its files).

    With --base, also validate the adapter against that checkpoint and exit 3
    when they do not fit. With --stats, measure what every module changes
    (exactly, without forming ΔW) and show a layers × module-type heat map.
    With --for ENGINE, also run `check` and exit 3 when not ready.
    """
    from ..commands.inspect import AdapterReport
    from ..commands.inspect import inspect as run_inspect
    from ..errors import IncompatibleError

    report = run_inspect(path, base=base, alpha=alpha, renames=renames, **hub)
    statistics = _adapter_statistics(report, path, base, alpha, stats, plot, {**hub, "executor": executor})
    inspected = {**report.to_dict(), "stats": statistics.to_dict()} if statistics else report.to_dict()
    serving = {"engine": engine, "max_lora_rank": max_lora_rank}
    checking = engine is not None
    if as_json and not checking:
        print_json(inspected)
    elif isinstance(report, AdapterReport) and not as_json:
        render_adapter(report, show_all)
        if statistics is not None:
            from .render.analysis import render_stats

            render_stats(stderr_console(), statistics)
    elif not as_json:
        render_checkpoint(report)
    ready = _run_check(path, base, alpha, as_json, serving, inspected if as_json else None) if checking else None
    validation = getattr(report, "validation", None)
    if validation is not None and not validation.compatible:
        raise IncompatibleError(f"{path} does not fit {base}", validation.problems)
    if ready is False:
        fail(click.get_current_context(), f"{path} is not ready for {serving['engine']}", EXIT_INVALID)


def _run_check(path: str, base: str | None, alpha: float | None, as_json: bool, serving: dict, inspected=None) -> bool:
    """Run `check` for `serving["engine"]`, print its report (JSON on stdout, else lines on stderr); return ready."""
    from ..commands.check import check
    from ..serving.findings import report_lines

    report = check(path, engine=serving["engine"], base=base, max_lora_rank=serving["max_lora_rank"], alpha=alpha)
    annotate_findings(report)
    if as_json:
        print_json({**inspected, "check": report.to_dict()} if inspected is not None else report.to_dict())
    else:
        record_report(report.to_dict(), key="check")
        for line in report_lines(report):
            click.echo(line, err=True)
    return report.ready


@click.command(cls=GroupedCommand)
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), help="Base model folder (config.json alone is enough for llama.cpp rules).")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@engine_options
@json_option
@junit_option
def check(adapter: str, base: str | None, alpha: float | None, as_json: bool, **serving) -> None:
    """Check ADAPTER for a serving engine (--for vllm|sglang|llama.cpp|mlx): exit 0 ready, 3 not.

    Lists every reason the engine would reject the adapter or silently ignore part of it, with what to do.
    """
    if serving["engine"] is None:
        raise click.UsageError("Missing option '--for' (vllm, sglang, llama.cpp or mlx).")
    if not _run_check(adapter, base, alpha, as_json, serving):
        fail(click.get_current_context(), f"{adapter} is not ready for {serving['engine']}", EXIT_INVALID)


@click.command(cls=GroupedCommand)
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--base", type=click.Path(), help="Also check every module against this base checkpoint's shapes.")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@json_option
@junit_option
def validate(paths: tuple[str, ...], base: str | None, alpha: float | None, as_json: bool) -> None:
    """Validate adapters from their headers alone: readable, and fitting --base when given.

    PATHS are adapter folders or files, or any files inside adapter folders
    (as a pre-commit hook passes them); files of no adapter are skipped.
    Reads no tensor data and never imports torch. Exit 3 when any adapter is invalid.
    """
    from ..commands.validate import validate as run_validate

    report = run_validate(paths, base=base, alpha=alpha)
    if as_json:
        print_json(report.to_dict())
    else:
        record_report(report.to_dict())
        for adapter in report.adapters:
            _print_adapter_check(adapter)
        if not report.adapters:
            click.echo(f"no adapter among the {len(report.skipped)} path(s) given: nothing to validate", err=True)
    invalid = [adapter for adapter in report.adapters if adapter.problems]
    for adapter in invalid:  # one annotation per adapter: GitHub shows only the first ten of a step
        annotate("error", "\n".join([f"{len(adapter.problems)} problem(s):", *adapter.problems]), file=adapter.path)
    if invalid:
        fail(click.get_current_context(), f"{len(invalid)} of {len(report.adapters)} adapter(s) invalid", EXIT_INVALID)


def _print_adapter_check(adapter) -> None:
    """✓ or ✗ and the adapter, then each problem and note on its own line."""
    if adapter.problems:
        click.echo(f"✗ {adapter.path}: {len(adapter.problems)} problem(s)", err=True)
        for problem in adapter.problems:
            click.echo(f"  {problem}", err=True)
    else:
        fits = f" and fits {adapter.base}" if adapter.base else ""
        click.echo(f"✓ {adapter.path}: {len(adapter.modules)} modules{fits}", err=True)
    for note in adapter.notes:
        click.echo(f"  note: {note}", err=True)


@click.command(cls=GroupedCommand)
@click.argument("first", type=click.Path())
@click.argument("second", type=click.Path())
@click.option("--expect-identical", is_flag=True, help="Exit 3 unless every tensor is byte-identical.")
@click.option("--max-ulp", type=click.IntRange(min=0), help="Exit 3 if any tensor differs by more than N ulp.")
@click.option("--no-spectrum", is_flag=True, help="Skip the rank-for-90/99 %-energy of changed 2-D tensors.")
@plot_option
@json_option
@junit_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@hub_input_options
def diff(first: str, second: str, expect_identical: bool, max_ulp: int | None, no_spectrum: bool, plot: str | None,
         as_json: bool, quiet: bool, revision: str | None, token: str | None) -> None:  # fmt: skip
    """Compare two checkpoints FIRST and SECOND tensor by tensor.

    Per tensor: identical or not, max |Δ|, relative Frobenius change, max
    distance in ulp of the stored dtype, and for 2-D tensors the rank holding
    90/99 % of the change. Exits 0 whatever differs, unless --expect-identical
    or --max-ulp is given and violated (exit 3).
    """
    from ..commands.diff import diff as run_diff
    from ..errors import IncompatibleError

    with count_progress(quiet, "diff") as progress:
        report = run_diff(first, second, spectrum=not no_spectrum, revision=revision, token=token, progress=progress)
    if plot:
        from ..analysis.plot import plot_diff

        plot_diff(report, plot)
    if as_json:
        print_json(report.to_dict())
    else:
        from .render.analysis import render_diff

        render_diff(stderr_console(), report)
    problems = report.violations(expect_identical=expect_identical, max_ulp=max_ulp)
    if problems:
        gate = "--expect-identical" if expect_identical else f"--max-ulp {max_ulp}"
        raise IncompatibleError(f"{first} and {second} fail {gate}", problems)


@click.command(cls=GroupedCommand)
@json_option
def env(as_json: bool) -> None:
    """Print versions, devices and Hub settings, for bug reports.

    Lists lora_tools, Python, torch, safetensors, huggingface_hub and the
    optional libraries, CPU count, CUDA / MPS devices, the HF cache path, and
    whether a Hub token is configured (yes or no; never the token).
    """
    from ..commands.environment import collect_environment

    report = collect_environment()
    if as_json:
        print_json(report.to_dict())
        return
    render_environment(report)
