"""`loratool`: parse options, call the library, render the report.

Errors are turned into exit codes and one `error: …` line in one place
(`LoraToolGroup.invoke`). Heavy modules (torch) are imported inside commands so
that `loratool --help` starts instantly.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable
from contextlib import suppress

import click

from . import __version__
from .cli_help import GroupedCommand
from .console import byte_progress as _progress
from .console import count_progress as _module_progress
from .console import set_color
from .console import stderr_console as _stderr_console
from .errors import EXIT_INTERNAL, EXIT_INVALID, Interrupted, LoraToolError, os_error_problem
from .units import format_bytes, parse_size

__all__ = ["cli", "main"]


def _fail(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(code)


def _raise_on_sigterm(signum, frame):
    raise Interrupted("SIGTERM", 143)


class LoraToolGroup(click.Group):
    """A group that maps every error to its exit code and a one-line message."""

    command_class = GroupedCommand

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
        _ignore_file_size_signal()
        _debug_log()
        try:
            return super().invoke(ctx)
        except LoraToolError as exc:
            if os.environ.get("LORATOOL_DEBUG"):
                traceback.print_exc()
            _fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            if os.environ.get("LORATOOL_DEBUG"):
                traceback.print_exc()
            _fail(ctx, "interrupted by SIGINT; temporary output removed", 130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # the machine (full disk, read-only folder …) or a bug: say which
            problem = os_error_problem(exc)
            if problem is not None:
                if os.environ.get("LORATOOL_DEBUG"):
                    traceback.print_exc()
                _fail(ctx, str(problem), problem.exit_code)
            if os.environ.get("LORATOOL_DEBUG"):
                raise
            _fail(
                ctx,
                f"internal error: {type(exc).__name__}: {exc} (rerun with LORATOOL_DEBUG=1 for a traceback, "
                "and please report it)",
                EXIT_INTERNAL,
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _ignore_file_size_signal() -> None:
    """Past `ulimit -f` a write then fails with EFBIG (reported as exit 4) instead of SIGXFSZ killing us.

    CPython already ignores SIGXFSZ at start-up; an embedding program may not.
    """
    if hasattr(signal, "SIGXFSZ") and _main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _debug_log() -> None:
    """With LORATOOL_DEBUG set, the library's debug lines (e.g. how output space was reserved) go to stderr."""
    import logging

    class StderrHandler(logging.StreamHandler):
        stream = property(lambda self: sys.stderr, lambda self, value: None)  # whatever stderr is at the time

    logger = logging.getLogger("lora_tools")
    if os.environ.get("LORATOOL_DEBUG") and not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class ByteSize(click.ParamType):
    """A byte size such as 500MB, 5GB or 10GiB."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except LoraToolError as exc:
            self.fail(str(exc), param, ctx)


def device_option(f: Callable) -> Callable:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="Where to compute: auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N, mps, or a list (cuda:0,cuda:1).",
    )(f)


def workers_option(f: Callable) -> Callable:
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Modules computed at once, one core each (default: the usable cores; one per device for a list).",
    )(f)


def dtype_option(f: Callable) -> Callable:
    return click.option(
        "--dtype",
        type=click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"], case_sensitive=False),
        default=None,
        help="Output dtype for every float tensor (default: keep each tensor's dtype).",
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")(f)


def engine_options(f: Callable) -> Callable:
    f = click.option("--max-lora-rank", type=int, help="The server's rank limit (default: the engine's own).")(f)
    return click.option(
        "--for",
        "engine",
        type=click.Choice(["vllm", "sglang", "llama.cpp", "mlx"]),
        help="Serving engine to check for.",
    )(f)


def output_options(f: Callable) -> Callable:
    f = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")(f)
    f = click.option("--force", is_flag=True, help="Replace an existing OUT (only once the new one is complete).")(f)
    return click.option(
        "--output", "-o", required=True, type=click.Path(), help="Output folder (or .safetensors file)."
    )(f)


def hub_input_options(f: Callable) -> Callable:
    f = click.option("--token", envvar=None, help="Hub token (default: HF_TOKEN or the login file). Never printed.")(f)
    return click.option("--revision", help="Revision for inputs given as Hub repo ids (or write org/name@rev).")(f)


def push_options(f: Callable) -> Callable:
    f = click.option("--commit-message", help="Commit message for --push-to-hub.")(f)
    f = click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")(f)
    f = click.option("--push-branch", help="Branch to push to (default: main).")(f)
    f = click.option("--private", is_flag=True, help="Create the repo private.")(f)
    return click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", help="Publish the output as one commit.")(f)


def _silence_hub_progress(quiet: bool) -> None:
    if quiet:
        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":  # `launch` sets it before a load starts
            from .compute.preload import finish

            finish()  # nothing may change the environment while torch's libraries load
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


def _before_computing(quiet: bool, load_torch: bool = True) -> None:
    """Silence the Hub's progress bars (an environment variable), then start loading torch's libraries
    on another core while the inputs are read, unless `launch` started it already: in that order, as
    nothing may change the environment while that load runs (`compute.preload`)."""
    _silence_hub_progress(quiet)
    if load_torch:
        from .compute.preload import start

        start()


_PUSH_KEYS = ("push_to_hub", "private", "push_branch", "create_pr", "commit_message")


def _pop_push_settings(options: dict) -> dict:
    """Take the --push-to-hub options out of a command's options."""
    return {key: options.pop(key) for key in _PUSH_KEYS}


def _publish(output: str, options: dict, token: str | None, as_json: bool) -> dict | None:
    """Push a finished output when --push-to-hub was given; return the push report as a dict."""
    repo_id = options.pop("push_to_hub")
    private, branch = options.pop("private"), options.pop("push_branch")
    create_pr, message = options.pop("create_pr"), options.pop("commit_message")
    if repo_id is None:
        return None
    from .io.hub import push as run_push

    report = run_push(
        output, repo_id, private=private, revision=branch, create_pr=create_pr, commit_message=message, token=token
    )
    if not as_json:
        where = report.pull_request_url or report.commit_url
        _stderr_console().print(f"pushed {output} to {report.repo_id}: {where}")
    return report.to_dict()


#: Version of every `--json` report's layout; bumped only when a field changes meaning or goes away.
JSON_SCHEMA = 1


def _print_json(data: dict) -> None:
    click.echo(json.dumps({"schema": JSON_SCHEMA, **data}, indent=2, default=str))


@click.group(cls=LoraToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Colour on stderr; auto follows the terminal, NO_COLOR and FORCE_COLOR.",
)
def cli(color: str) -> None:
    """Inspect, validate, merge, un-merge and extract LoRA adapters.

    Streams one tensor at a time, merges in fp32 with a single rounding, and
    writes outputs atomically. Set LORATOOL_DEBUG=1 for tracebacks; attach the
    output of `loratool env` to bug reports.
    """
    set_color(color)


class PlotPath(click.Path):
    """A picture to write: its extension (.png or .svg) chooses the format."""

    def convert(self, value, param, ctx):
        from .analysis.plot import PLOT_SUFFIXES

        if not str(value).lower().endswith(PLOT_SUFFIXES):
            self.fail(f"{value!r}: use a .png or .svg file name (the extension chooses the format)", param, ctx)
        return super().convert(value, param, ctx)


def plot_option(f: Callable) -> Callable:
    return click.option(
        "--plot", type=PlotPath(dir_okay=False), metavar="FILE", help="Also draw the result as a PNG or SVG picture."
    )(f)


def _adapter_statistics(
    report, path: str, base: str | None, alpha: float | None, stats: bool, plot: str | None, hub: dict
):
    """inspect --stats (and --plot): the statistics of an adapter, drawn when asked."""
    from .inspection import AdapterReport

    if not (stats or plot):
        return None
    if not isinstance(report, AdapterReport):
        raise click.UsageError("--stats and --plot describe adapters; to compare checkpoints use `loratool diff`")
    from .analysis.stats import adapter_stats

    statistics = adapter_stats(path, base=base, alpha=alpha, **hub)
    if plot:
        from .analysis.plot import plot_stats

        plot_stats(statistics, plot)
    return statistics


@cli.command()
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
@engine_options
@json_option
@hub_input_options
def inspect(
    path: str, base: str | None, show_all: bool, alpha: float | None, renames: tuple, stats: bool, plot: str | None,
    as_json: bool, engine: str | None, max_lora_rank: int | None, **hub,
) -> None:  # fmt: skip
    """Describe an adapter or checkpoint at PATH (detected from its files).

    With --base, also validate the adapter against that checkpoint and exit 3
    when they do not fit. With --stats, measure what every module changes
    (exactly, without forming ΔW) and show a layers × module-type heat map.
    With --for ENGINE, also run `check` and exit 3 when not ready.
    """
    from .errors import IncompatibleError
    from .inspection import AdapterReport
    from .inspection import inspect as run_inspect

    report = run_inspect(path, base=base, alpha=alpha, renames=renames, **hub)
    statistics = _adapter_statistics(report, path, base, alpha, stats, plot, hub)
    inspected = {**report.to_dict(), "stats": statistics.to_dict()} if statistics else report.to_dict()
    serving = {"engine": engine, "max_lora_rank": max_lora_rank}
    checking = engine is not None
    if as_json and not checking:
        _print_json(inspected)
    elif isinstance(report, AdapterReport) and not as_json:
        _render_adapter(report, show_all)
        if statistics is not None:
            from .analysis.terminal import render_stats

            render_stats(_stderr_console(), statistics)
    elif not as_json:
        _render_checkpoint(report)
    ready = _run_check(path, base, alpha, as_json, serving, inspected if as_json else None) if checking else None
    validation = getattr(report, "validation", None)
    if validation is not None and not validation.compatible:
        raise IncompatibleError(f"{path} does not fit {base}", validation.problems)
    if ready is False:
        _fail(click.get_current_context(), f"{path} is not ready for {serving['engine']}", EXIT_INVALID)


def _run_check(path: str, base: str | None, alpha: float | None, as_json: bool, serving: dict, inspected=None) -> bool:
    """Run `check` for `serving["engine"]`, print its report (JSON on stdout, else lines on stderr); return ready."""
    from .serving.check import check, report_lines

    report = check(path, engine=serving["engine"], base=base, max_lora_rank=serving["max_lora_rank"], alpha=alpha)
    if as_json:
        _print_json({**inspected, "check": report.to_dict()} if inspected is not None else report.to_dict())
    else:
        for line in report_lines(report):
            click.echo(line, err=True)
    return report.ready


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), help="Base model folder (config.json alone is enough for llama.cpp rules).")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@engine_options
@json_option
def check(adapter: str, base: str | None, alpha: float | None, as_json: bool, **serving) -> None:
    """Check ADAPTER for a serving engine (--for vllm|sglang|llama.cpp|mlx): exit 0 ready, 3 not.

    Lists every reason the engine would reject the adapter or silently ignore part of it, with what to do.
    """
    if serving["engine"] is None:
        raise click.UsageError("Missing option '--for' (vllm, sglang, llama.cpp or mlx).")
    if not _run_check(adapter, base, alpha, as_json, serving):
        _fail(click.get_current_context(), f"{adapter} is not ready for {serving['engine']}", EXIT_INVALID)


def _render_adapter(report, show_all: bool) -> None:
    from rich.table import Table

    console = _stderr_console()
    flags = [f for f, on in (("rsLoRA", report.use_rslora), ("DoRA", report.use_dora)) if on]
    console.print(
        f"[bold]{report.path}[/bold]: {report.format} adapter"
        + (f" for {report.base_model}" if report.base_model else "")
        + (f" ({', '.join(flags)})" if flags else "")
    )
    console.print(
        f"{report.num_parameters:,} parameters, {format_bytes(report.total_bytes)}, "
        f"dtypes {', '.join(f'{k}×{v}' for k, v in report.dtypes.items())}, {len(report.modules)} modules"
    )
    table = Table(show_edge=False)
    if show_all:
        mapped = any(m.rule for m in report.modules)  # a name-map column only when some module was renamed
        for column in ("module", "type", "rank", "alpha", "scale", "DoRA", *(("mapped by",) if mapped else ())):
            table.add_column(column)
        for m in report.modules:
            row = (m.name, m.type, str(m.rank), f"{m.alpha:g}", f"{m.scale:g}", "yes" if m.dora else "")
            table.add_row(*row, *((m.rule,) if mapped else ()))
    else:
        for column in ("target", "type", "count", "rank", "alpha", "scale", "DoRA"):
            table.add_column(column)
        groups: dict[tuple, int] = {}
        for m in report.modules:
            key = (m.target, m.type, m.rank, m.alpha, m.scale, m.dora)
            groups[key] = groups.get(key, 0) + 1
        for (target, kind, rank, alpha, scale, dora), count in groups.items():
            table.add_row(target, kind, str(count), str(rank), f"{alpha:g}", f"{scale:g}", "yes" if dora else "")
    console.print(table)
    rules = Counter(m.rule for m in report.modules if m.rule)
    for rule, count in rules.items():
        console.print(f"name map: {count} module(s) by {rule}")
    for item in report.replacements:
        rows = f" rows {item['rows']}" if item["rows"] else ""
        console.print(f"replaces {item['target']}{rows} ({item['origin']})")
    if report.unknown_keys:
        console.print(
            f"[yellow]{len(report.unknown_keys)} keys not understood:[/yellow] {', '.join(report.unknown_keys[:10])}"
        )
    for key, value in report.metadata.items():
        console.print(f"metadata {key} = {value}")
    if report.validation is not None:
        if report.validation.compatible:
            console.print(f"[green]compatible with {report.validation.base}[/green]")
        else:
            for problem in report.validation.problems:
                console.print(f"[red]✗[/red] {problem}")


def _render_checkpoint(report) -> None:
    console = _stderr_console()
    console.print(
        f"[bold]{report.path}[/bold]: checkpoint"
        + (f" ({report.architecture or report.layout})" if report.architecture or report.layout else "")
    )
    console.print(
        f"{report.num_tensors} tensors, {report.num_parameters:,} parameters, {format_bytes(report.total_bytes)}, "
        f"dtypes {', '.join(f'{k}×{v}' for k, v in report.dtypes.items())}"
    )
    console.print(f"files: {', '.join(report.files)}; lm_head: {report.lm_head}")
    quantization = report.quantization or {}
    if "unsupported" in quantization:
        console.print(f"[red]quantization:[/red] {quantization['unsupported']}")
    elif quantization:
        formats = ", ".join(f"{name} ×{count}" for name, count in quantization["formats"].items())
        console.print(f"quantization: {quantization['method']}: {formats}")


def _merge_command(operation: str):
    from .merging import merge as run_merge
    from .merging import unmerge as run_unmerge

    return run_merge if operation == "merge" else run_unmerge


def _merge_options(f: Callable) -> Callable:
    f = click.option("--allow-nonfinite", is_flag=True, help="Write NaN/Inf results instead of refusing them.")(f)
    f = click.option(
        "--allow-unmatched", is_flag=True, help="Merge what matches; leave out (and count) modules matching nothing."
    )(f)
    f = click.option("--checksum", is_flag=True, help="Add the sha256 of every output file to the report.")(f)
    f = click.option(
        "--rename", "renames", multiple=True, metavar="REGEX=REPLACEMENT",
        help="Rename adapter module paths before matching them to the base (repeatable).",
    )(f)  # fmt: skip
    f = click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")(f)
    f = click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")(f)
    f = click.option(
        "--max-shard-size", type=ByteSize(), default="5GB", show_default=True, help="Largest output shard."
    )(f)
    f = click.option(
        "--weight", "-w", "weights", type=float, multiple=True, help="Weight of each adapter, in order (default 1)."
    )(f)
    return push_options(hub_input_options(json_option(dtype_option(device_option(output_options(f))))))


def _run_merge(operation: str, base: str, adapters: tuple[str, ...], options: dict) -> None:
    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    _before_computing(quiet, load_torch=not options["dry_run"])
    push_settings = _pop_push_settings(options)
    if push_settings["push_to_hub"] and options["dry_run"]:
        raise click.UsageError("--dry-run writes nothing, so there is nothing to --push-to-hub")
    run = _merge_command(operation)
    output = options.pop("output")
    with _progress(quiet or options["dry_run"], operation) as progress:
        report = run(base, list(adapters), output, progress=progress, **options)
    console = _stderr_console()
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    pushed = _publish(output, push_settings, options["token"], as_json)
    if as_json:
        _print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    if report.dry_run:
        for change in report.changes:
            parts = []
            for term in change.terms:
                if "replaced_by" in term:
                    parts.append(f"replaced by {term['replaced_by']} ({term['origin']})")
                else:
                    parts.append(f"{term['kind']} r={term['rank']} scale={term['scale']:g} w={term['weight']:g}")
            console.print(f"{change.tensor} ← {'; '.join(parts)}")
        console.print(
            f"dry run: would write {format_bytes(report.bytes_written)} in {len(report.files)} file(s) "
            f"({report.tensors_changed} tensors changed, {report.tensors_copied} copied)"
        )
        return
    verb = "merged" if operation == "merge" else "un-merged"
    console.print(
        f"{verb} {len(report.adapters)} adapter(s) into {report.output}: {report.tensors_changed} tensors changed, "
        f"{report.tensors_copied} copied, {format_bytes(report.bytes_written)} in {report.seconds:.1f}s on "
        f"{report.device}; max |ΔW| {report.max_abs_delta:.3g}"
    )
    for name, row in report.quantization.items():
        console.print(
            f"requantized {row['tensors']} tensor(s) as {name}: ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖ "
            f"max {row['max']:.3g}, mean {row['mean']:.3g}"
        )


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@_merge_options
def merge(base: str, adapters: tuple[str, ...], **options) -> None:
    """Merge ADAPTERS into BASE: W' = W + Σ wᵢ·ΔWᵢ, written to --output.

    BASE is a model folder or weights file; each ADAPTER a PEFT folder or
    adapter file. Arithmetic is fp32 with one rounding to the output dtype.
    """
    _run_merge("merge", base, adapters, options)


@cli.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@_merge_options
def unmerge(merged: str, adapters: tuple[str, ...], **options) -> None:
    """Remove ADAPTERS from MERGED: W = W' − Σ wᵢ·ΔWᵢ, written to --output.

    DoRA is undone exactly only for folders merged by loratool (they keep
    loratool_merge.json with the norms).
    """
    _run_merge("unmerge", merged, adapters, options)


def rank_options(f: Callable) -> Callable:
    f = click.option("--checksum", is_flag=True, help="Add the sha256 of every output file to the report.")(f)
    f = click.option("--max-rank", type=int, help="Cap on every module's rank.")(f)
    f = click.option("--sv-ratio", type=float, help="Keep singular values ≥ S₀/X.")(f)
    f = click.option("--energy", type=float, help="Smallest rank keeping this fraction of ‖Δ‖²_F, in (0, 1].")(f)
    return click.option("--rank", "-r", type=int, help="Fixed rank for every module.")(f)


def _render_extraction(report, as_json: bool, pushed: dict | None = None) -> None:
    if as_json:
        _print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    from rich.table import Table

    console = _stderr_console()
    table = Table(show_edge=False)
    for column in ("module", "rank", "energy kept", "rel. error", "method"):
        table.add_column(column)
    for m in report.modules:
        table.add_row(m.name, str(m.rank), f"{m.energy_kept:.4f}", f"{m.relative_error:.4f}", m.method)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    ratio = report.parameters / report.full_delta_parameters if report.full_delta_parameters else 0.0
    whole = "the full delta" if report.operation == "extract" else "the original adapter"
    console.print(
        f"{report.operation}: {len(report.modules)} modules into {report.output}, {report.parameters:,} parameters "
        f"({ratio:.2%} of {whole}), {format_bytes(report.bytes)}, mean relative error "
        f"{report.mean_relative_error:.4f}, {report.seconds:.1f}s on {report.device}"
    )


@cli.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@rank_options
@click.option("--include", help="Only tensors whose name matches this regex.")
@click.option("--exclude", help="Leave out tensors whose name matches this regex.")
@click.option("--method", type=click.Choice(["auto", "svd", "randomized"]), default="auto", show_default=True)
@click.option(
    "--embeddings", type=click.Choice(["skip", "lora", "full"]), default="skip", show_default=True,
    help="Embeddings and lm_head: skip, decompose as LoRA, or store whole (modules_to_save).",
)  # fmt: skip
@click.option("--save-1d", is_flag=True, help="Store changed norms (1-D tensors) in modules_to_save.")
@click.option("--skip-mismatched", is_flag=True, help="Leave out tensors whose shapes differ or exist on one side.")
@plot_option
@device_option
@workers_option
@dtype_option
@output_options
@json_option
@hub_input_options
@push_options
def extract(base: str, tuned: str, **options) -> None:
    """Extract a LoRA adapter from a full fine-tune: TUNED − BASE ≈ B·A per module.

    Truncated SVD (randomized when the rank is small), balanced factors, alpha =
    rank. Writes a PEFT adapter folder to --output.
    """
    from .extraction import extract as run_extract

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    _before_computing(quiet)
    push_settings = _pop_push_settings(options)
    output, plot = options.pop("output"), options.pop("plot")
    with _module_progress(quiet, "extract") as progress:
        report = run_extract(base, tuned, output, progress=progress, **options)
    if plot:
        from .analysis.plot import plot_extraction

        plot_extraction(report, plot)
    _render_extraction(report, as_json, _publish(output, push_settings, options["token"], as_json))


@cli.command()
@click.argument("adapter", type=click.Path())
@rank_options
@device_option
@workers_option
@output_options
@json_option
@hub_input_options
@push_options
def resize(adapter: str, **options) -> None:
    """Change an adapter's rank: the best rank-k approximation of each module's ΔW.

    Exact (QR of B and Aᵀ, SVD of the r×r core); each module's scale is kept.
    """
    from .extraction import resize as run_resize

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    _before_computing(quiet)
    push_settings = _pop_push_settings(options)
    output = options.pop("output")
    with _module_progress(quiet, "resize") as progress:
        report = run_resize(adapter, output, progress=progress, **options)
    _render_extraction(report, as_json, _publish(output, push_settings, options["token"], as_json))


@cli.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option(
    "--weight", "-w", "weights", type=float, multiple=True, help="Weight of each adapter, in order (default 1)."
)
@click.option(
    "--method", type=click.Choice(["cat", "svd", "ties", "dare-linear", "dare-ties", "magnitude-prune"]),
    default="cat", show_default=True, help="cat: exact (rank Σ rᵢ); svd: best rank-k; the rest prune ΔWᵢ first.",
)  # fmt: skip
@rank_options
@click.option("--density", type=float, help="Fraction of each ΔWᵢ kept by ties / dare-* / magnitude-prune, (0, 1].")
@click.option(
    "--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
    help="TIES sign election: by the sum of values or by the count of signs.",
)  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of DARE's random drop.")
@click.option(
    "--to", "to", type=click.Choice(["peft", "kohya"]), default="peft", show_default=True,
    help="Write a PEFT folder or a kohya .safetensors file.",
)  # fmt: skip
@click.option("--base", type=click.Path(), help="Base model, to match kohya names to dotted module paths.")
@click.option("--component", help="Take only this pipeline component (unet, text_encoder, …).")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@device_option
@output_options
@json_option
@hub_input_options
@push_options
def combine(adapters: tuple[str, ...], **options) -> None:
    """Combine ADAPTERS into one adapter: ΔW = Σ wᵢ·ΔWᵢ per module (cat), or its best rank-k (svd).

    ties, dare-linear, dare-ties and magnitude-prune apply PEFT's definitions to
    each full ΔWᵢ, then re-factorise like svd (default rank: the largest input rank).
    """
    from .combine import combine as run_combine

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    _before_computing(quiet)
    push_settings = _pop_push_settings(options)
    output = options.pop("output")
    with _module_progress(quiet, "combine") as progress:
        report = run_combine(list(adapters), output, progress=progress, **options)
    _render_combination(report, as_json, _publish(output, push_settings, options["token"], as_json))


def _render_combination(report, as_json: bool, pushed: dict | None) -> None:
    if as_json:
        _print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    from rich.table import Table

    console = _stderr_console()
    table = Table(show_edge=False)
    for column in ("module", "adapters", "rank in", "rank out", "rel. error", "route"):
        table.add_column(column)
    for m in report.modules:
        adapters = ",".join(map(str, m.adapters))
        table.add_row(m.name, adapters, str(m.rank_in), str(m.rank_out), f"{m.relative_error:.3g}", m.route)
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    console.print(
        f"combine ({report.method}): {len(report.inputs)} adapters, {len(report.modules)} modules into "
        f"{report.output}, {report.parameters:,} parameters, {format_bytes(report.bytes)}, relative error mean "
        f"{report.mean_relative_error:.3g} max {report.max_relative_error:.3g}, {report.seconds:.1f}s on {report.device}"
    )


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option(
    "--to", "to", type=click.Choice(["peft", "kohya", "gguf", "mlx", "diffusers"]), required=True, help="Target format."
)
@click.option(
    "--naming",
    type=click.Choice(["diffusers", "original"]),
    help="Diffusion models: module names of diffusers or of the original single file (LDM/BFL/SD3); needs --base.",
)
@click.option(
    "--base", type=click.Path(), help="Base model: matches kohya names to module paths; its config lays out GGUF."
)
@click.option("--component", help="Pipeline component to take or to name (unet, text_encoder, …).")
@click.option("--rank", "-r", type=int, help="Rank for re-factorising LoHa / LoKr / Tucker modules as LoRA.")
@click.option("--bake-alpha", is_flag=True, help="Fold the scale into B and set alpha = rank.")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@click.option("--checksum", is_flag=True, help="Add the sha256 of every output file to the report.")
@click.option("--drop-unsupported", is_flag=True, help="gguf/mlx: leave out (and report) what the format cannot carry.")
@workers_option
@output_options
@json_option
@hub_input_options
def convert(adapter: str, **options) -> None:
    """Convert ADAPTER between PEFT, kohya, GGUF (llama.cpp), mlx-lm and diffusers formats (--to).

    LoRA factors are copied exactly and alpha is carried unless --bake-alpha;
    LoHa / LoKr / Tucker modules become LoRA only by re-factorising ΔW to --rank.
    Diffusion LoRAs change naming with --naming diffusers|original (fused qkv exact).
    """
    from .convert import convert as run_convert

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    _silence_hub_progress(quiet)
    report = run_convert(adapter, options.pop("output"), **options)
    _render_extraction(report, as_json)


@cli.command()
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (default: main).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", help="Commit message.")
@click.option("--token", help="Hub token (default: HF_TOKEN or the login file). Never printed.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@json_option
def push(folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool,
         commit_message: str | None, token: str | None, quiet: bool, as_json: bool) -> None:  # fmt: skip
    """Publish FOLDER (made earlier by loratool or not) to the Hub repo REPO_ID as one commit.

    Creates the repo if needed. The token comes from --token, HF_TOKEN or the
    huggingface_hub login file and is never printed.
    """
    from .io.hub import push as run_push

    _silence_hub_progress(quiet)
    report = run_push(
        folder, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
        token=token,
    )  # fmt: skip
    if as_json:
        _print_json(report.to_dict())
    else:
        _stderr_console().print(f"pushed {folder} to {report.repo_id}: {report.pull_request_url or report.commit_url}")


@cli.command()
@click.argument("first", type=click.Path())
@click.argument("second", type=click.Path())
@click.option("--expect-identical", is_flag=True, help="Exit 3 unless every tensor is byte-identical.")
@click.option("--max-ulp", type=click.IntRange(min=0), help="Exit 3 if any tensor differs by more than N ulp.")
@click.option("--no-spectrum", is_flag=True, help="Skip the rank-for-90/99 %-energy of changed 2-D tensors.")
@plot_option
@json_option
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
    from .analysis.diff import diff as run_diff
    from .errors import IncompatibleError

    with _module_progress(quiet, "diff") as progress:
        report = run_diff(first, second, spectrum=not no_spectrum, revision=revision, token=token, progress=progress)
    if plot:
        from .analysis.plot import plot_diff

        plot_diff(report, plot)
    if as_json:
        _print_json(report.to_dict())
    else:
        from .analysis.terminal import render_diff

        render_diff(_stderr_console(), report)
    problems = report.violations(expect_identical=expect_identical, max_ulp=max_ulp)
    if problems:
        gate = "--expect-identical" if expect_identical else f"--max-ulp {max_ulp}"
        raise IncompatibleError(f"{first} and {second} fail {gate}", problems)


@cli.command()
@json_option
def env(as_json: bool) -> None:
    """Print versions, devices and Hub settings, for bug reports.

    Lists lora_tools, Python, torch, safetensors, huggingface_hub and the
    optional libraries, CPU count, CUDA / MPS devices, the HF cache path, and
    whether a Hub token is configured (yes or no; never the token).
    """
    from .environment import collect_environment

    report = collect_environment()
    if as_json:
        _print_json(report.to_dict())
        return
    _render_environment(report)


def _render_environment(report) -> None:
    rows = [("lora_tools", report.lora_tools), ("python", report.python), ("platform", report.platform)]
    rows += [(name, version or "not installed") for name, version in report.libraries.items()]
    cuda = ", ".join(report.cuda_devices) if report.cuda_devices else "no"
    rows += [
        ("cpus", f"{report.usable_cpus} usable of {report.cpu_count}"),
        ("cuda", f"{cuda} (CUDA {report.cuda_version})" if report.cuda_available else "no"),
        ("mps", "yes" if report.mps_available else "no"),
        ("hf cache", report.hf_hub_cache),
        ("hf endpoint", report.hf_endpoint + (" (offline)" if report.hf_hub_offline else "")),
        ("hf token", "configured" if report.token_configured else "not configured"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")  # the data asked for: stdout, like --json


def main() -> None:
    """Console-script entry point: run the command, then end the process without tearing Python down.

    Once torch is imported, the interpreter's teardown (freeing every module's objects, then
    libtorch's static destructors) takes about a second on this machine, after every output is
    complete, closed and in place. So, as the interpreter would, the process waits for its
    threads (`threading._shutdown`) and runs the atexit handlers, flushes stdout and stderr,
    and then exits with the command's status at once. An exception that escapes (only with
    LORATOOL_DEBUG=1) ends the process the usual way, with its traceback.
    """
    try:
        cli.main(prog_name="loratool")
    except SystemExit as done:
        _end_process(done.code)


def _end_process(code) -> None:
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing more can reach it
            stream.flush()
    os._exit(code or 0)
