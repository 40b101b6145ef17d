"""The commands' reports for people (rich on stderr) and for programs (one JSON object on stdout)."""

from __future__ import annotations

import json
from collections import Counter

import click

from ...units import format_bytes
from ..ci.outcome import record_report, warning
from ..console import stderr_console

__all__ = [
    "JSON_SCHEMA",
    "print_json",
    "render_adapter",
    "render_checkpoint",
    "render_merge",
    "render_extraction",
    "render_combination",
    "render_environment",
]


#: Version of every `--json` report's layout; bumped only when a field changes meaning or goes away.
JSON_SCHEMA = 1


def print_json(data: dict) -> None:
    record_report(data)
    click.echo(json.dumps({"schema": JSON_SCHEMA, **data}, indent=2, default=str))


def _init_line(init: dict) -> str:
    """One line on an init that rewrote the base, or on why the adapter cannot be merged."""
    from rich.markup import escape

    if init["refusal"]:
        return f"[yellow]{escape(init['refusal'])}[/yellow]"
    return escape(f"init {init['name']!r} ({init['method']}): the base was rewritten at init (W_res = W - s*B0*A0); "
            "merge recomputes W_res from W, as PEFT does on load")  # fmt: skip


def render_adapter(report, show_all: bool) -> None:
    from rich.table import Table

    record_report(report.to_dict())
    console = stderr_console()
    flags = [f for f, on in (("rsLoRA", report.use_rslora), ("DoRA", report.use_dora)) if on]
    console.print(
        f"[bold]{report.path}[/bold]: {report.format} adapter"
        + (f", tuner {report.tuner}" if report.tuner else "")
        + (f" for {report.base_model}" if report.base_model else "")
        + (f" ({', '.join(flags)})" if flags else "")
    )
    if report.init is not None and (report.init["rewrites_base"] or report.init["refusal"]):
        console.print(_init_line(report.init))
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
            row = (m.name, m.type, *_rank_alpha(m.rank, m.alpha), f"{m.scale:g}", "yes" if m.dora else "")
            table.add_row(*row, *((m.rule,) if mapped else ()))
    else:
        for column in ("target", "type", "count", "rank", "alpha", "scale", "DoRA"):
            table.add_column(column)
        groups: dict[tuple, int] = {}
        for m in report.modules:
            key = (m.target, m.type, m.rank, m.alpha, m.scale, m.dora)
            groups[key] = groups.get(key, 0) + 1
        for (target, kind, rank, alpha, scale, dora), count in groups.items():
            table.add_row(target, kind, str(count), *_rank_alpha(rank, alpha), f"{scale:g}", "yes" if dora else "")
    console.print(table)
    settings = Counter(", ".join(f"{k}={v}" for k, v in m.params.items()) for m in report.modules if m.params)
    for line, count in settings.items():
        console.print(f"{report.tuner or 'tuner'} settings ({count} module(s)): {line}")
    rules = Counter(m.rule for m in report.modules if m.rule)
    for rule, count in rules.items():
        console.print(f"name map: {count} module(s) by {rule}")
    for item in report.replacements:
        rows = f" rows {item['rows']}" if item["rows"] else ""
        console.print(f"replaces {item['target']}{rows} ({item['origin']})")
    if report.unknown_keys:
        warning(f"{len(report.unknown_keys)} keys not understood: {', '.join(report.unknown_keys[:10])}")
    for key, value in report.metadata.items():
        console.print(f"metadata {key} = {value}")
    if report.validation is not None:
        if report.validation.compatible:
            console.print(f"[green]compatible with {report.validation.base}[/green]")
        else:
            for problem in report.validation.problems:
                console.print(f"[red]✗[/red] {problem}")


def render_checkpoint(report) -> None:
    record_report(report.to_dict())
    console = stderr_console()
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


def render_merge(report, operation: str) -> None:
    """A merge or un-merge report: the plan of a dry run, or what was written."""
    record_report(report.to_dict())
    console = stderr_console()
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


def render_extraction(report, as_json: bool, pushed: dict | None = None) -> None:
    if as_json:
        print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    from rich.table import Table

    record_report(report.to_dict())
    console = stderr_console()
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


def render_combination(report, as_json: bool, pushed: dict | None) -> None:
    if as_json:
        print_json({**report.to_dict(), "push": pushed} if pushed else report.to_dict())
        return
    from rich.table import Table

    record_report(report.to_dict())
    console = stderr_console()
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


def render_environment(report) -> None:
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


def _rank_alpha(rank: int, alpha: float) -> tuple[str, str]:
    """A module's rank and alpha as table cells; "–" for tuners that have none (IA3, and OFT by block size)."""
    return (str(rank), f"{alpha:g}") if rank else ("–", "–")
