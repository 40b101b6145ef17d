"""`loratool`: parse options, call the library, render the report.

Errors are turned into exit codes and one `error: …` line in one place
(`LoraToolGroup.invoke`). Heavy modules (torch) are imported inside commands so
that `loratool --help` starts instantly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import contextmanager

import click

from . import __version__
from .errors import EXIT_INTERNAL, Interrupted, LoraToolError
from .units import format_bytes, parse_size

__all__ = ["cli", "main"]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    ctx.exit(code)


def _raise_on_sigterm(signum, frame):
    raise Interrupted("SIGTERM", 143)


class LoraToolGroup(click.Group):
    """A group that maps every error to its exit code and a one-line message."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
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
        except Exception as exc:  # a bug: say so, and how to see it
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
        help="Where to compute: auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps.",
    )(f)


def dtype_option(f: Callable) -> Callable:
    return click.option(
        "--dtype",
        type=click.Choice(["bf16", "fp16", "fp32"]),
        default=None,
        help="Output dtype for every float tensor (default: keep each tensor's dtype).",
    )(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object on stdout.")(f)


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
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


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
    from .hub import push as run_push

    report = run_push(
        output, repo_id, private=private, revision=branch, create_pr=create_pr, commit_message=message, token=token
    )
    if not as_json:
        where = report.pull_request_url or report.commit_url
        _stderr_console().print(f"pushed {output} to {report.repo_id}: {where}")
    return report.to_dict()


def _print_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def _progress(quiet: bool, description: str):
    """Yield a (done, total) callback driving a rich byte progress bar on stderr."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@click.group(cls=LoraToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
def cli() -> None:
    """Inspect, validate, merge, un-merge and extract LoRA adapters.

    Streams one tensor at a time, merges in fp32 with a single rounding, and
    writes outputs atomically. Set LORATOOL_DEBUG=1 for tracebacks.
    """


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--base", type=click.Path(), help="Validate the adapter against this base checkpoint.")
@click.option("--all", "show_all", is_flag=True, help="List every module, not a grouped summary.")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@json_option
def inspect(path: str, base: str | None, show_all: bool, alpha: float | None, as_json: bool) -> None:
    """Describe an adapter or checkpoint at PATH (detected from its files).

    With --base, also validate the adapter against that checkpoint and exit 3
    when they do not fit.
    """
    from .errors import IncompatibleError
    from .inspection import AdapterReport
    from .inspection import inspect as run_inspect

    report = run_inspect(path, base=base, alpha=alpha)
    if as_json:
        _print_json(report.to_dict())
    elif isinstance(report, AdapterReport):
        _render_adapter(report, show_all)
    else:
        _render_checkpoint(report)
    validation = getattr(report, "validation", None)
    if validation is not None and not validation.compatible:
        raise IncompatibleError(f"{path} does not fit {base}", validation.problems)


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
        for column in ("module", "type", "rank", "alpha", "scale", "DoRA"):
            table.add_column(column)
        for m in report.modules:
            table.add_row(m.name, m.type, str(m.rank), f"{m.alpha:g}", f"{m.scale:g}", "yes" if m.dora else "")
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
        f"[bold]{report.path}[/bold]: checkpoint" + (f" ({report.architecture})" if report.architecture else "")
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
    _silence_hub_progress(quiet)
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


@contextmanager
def _module_progress(quiet: bool, description: str):
    if quiet:
        yield None
        return
    from rich.progress import Progress

    with Progress(console=_stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


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
@device_option
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
    _silence_hub_progress(quiet)
    push_settings = _pop_push_settings(options)
    output = options.pop("output")
    with _module_progress(quiet, "extract") as progress:
        report = run_extract(base, tuned, output, progress=progress, **options)
    _render_extraction(report, as_json, _publish(output, push_settings, options["token"], as_json))


@cli.command()
@click.argument("adapter", type=click.Path())
@rank_options
@device_option
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
    _silence_hub_progress(quiet)
    push_settings = _pop_push_settings(options)
    output = options.pop("output")
    with _module_progress(quiet, "resize") as progress:
        report = run_resize(adapter, output, progress=progress, **options)
    _render_extraction(report, as_json, _publish(output, push_settings, options["token"], as_json))


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("--to", "to", type=click.Choice(["peft", "kohya"]), required=True, help="Target format.")
@click.option("--base", type=click.Path(), help="Base model, to match kohya names to dotted module paths.")
@click.option("--component", help="Pipeline component to take or to name (unet, text_encoder, …).")
@click.option("--rank", "-r", type=int, help="Rank for re-factorising LoHa / LoKr / Tucker modules as LoRA.")
@click.option("--bake-alpha", is_flag=True, help="Fold the scale into B and set alpha = rank.")
@click.option("--alpha", type=float, help="lora_alpha for adapter files that do not record it.")
@click.option("--checksum", is_flag=True, help="Add the sha256 of every output file to the report.")
@output_options
@json_option
@hub_input_options
def convert(adapter: str, **options) -> None:
    """Convert ADAPTER between PEFT and kohya spellings (--to peft|kohya).

    LoRA factors are copied exactly and alpha is carried unless --bake-alpha;
    LoHa / LoKr / Tucker modules become LoRA only by re-factorising ΔW to --rank.
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
    from .hub import push as run_push

    _silence_hub_progress(quiet)
    report = run_push(
        folder, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
        token=token,
    )  # fmt: skip
    if as_json:
        _print_json(report.to_dict())
    else:
        _stderr_console().print(f"pushed {folder} to {report.repo_id}: {report.pull_request_url or report.commit_url}")


def main() -> None:
    """Console-script entry point."""
    cli.main(prog_name="loratool")
