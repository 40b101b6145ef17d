"""Options the commands share, declared once: devices, outputs, ranks, the Hub, pictures, merging."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..errors import LoraToolError
from ..units import parse_size

__all__ = [
    "ByteSize",
    "PlotPath",
    "device_option",
    "workers_option",
    "executor_option",
    "dtype_option",
    "json_option",
    "engine_options",
    "output_options",
    "hub_input_options",
    "push_options",
    "rank_options",
    "plot_option",
    "merge_options",
    "junit_option",
]


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


def executor_option(f: Callable) -> Callable:
    return click.option(
        "--executor",
        type=click.Choice(["local", "ray"]),
        default="local",
        show_default=True,
        help="local: this machine; ray: tasks on the Ray cluster at RAY_ADDRESS (a local Ray when unset).",
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
    return click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", help="Publish the output (resumable).")(f)


def rank_options(f: Callable) -> Callable:
    f = click.option("--checksum", is_flag=True, help="Add the sha256 of every output file to the report.")(f)
    f = click.option("--max-rank", type=int, help="Cap on every module's rank.")(f)
    f = click.option("--sv-ratio", type=float, help="Keep singular values ≥ S₀/X.")(f)
    f = click.option("--energy", type=float, help="Smallest rank keeping this fraction of ‖Δ‖²_F, in (0, 1].")(f)
    return click.option("--rank", "-r", type=int, help="Fixed rank for every module.")(f)


class PlotPath(click.Path):
    """A picture to write: its extension (.png or .svg) chooses the format."""

    def convert(self, value, param, ctx):
        from ..analysis.plot import PLOT_SUFFIXES

        if not str(value).lower().endswith(PLOT_SUFFIXES):
            self.fail(f"{value!r}: use a .png or .svg file name (the extension chooses the format)", param, ctx)
        return super().convert(value, param, ctx)


def plot_option(f: Callable) -> Callable:
    return click.option(
        "--plot", type=PlotPath(dir_okay=False), metavar="FILE", help="Also draw the result as a PNG or SVG picture."
    )(f)


def merge_options(f: Callable) -> Callable:
    f = click.option(
        "--residual-base", is_flag=True,
        help="BASE is the residual model PEFT saved at a PiSSA/OLoRA/CorDA/LoftQ init: add s·B·A to it as is.",
    )(f)  # fmt: skip
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
    f = junit_option(f)
    f = executor_option(f)
    return push_options(hub_input_options(json_option(dtype_option(device_option(output_options(f))))))


def junit_option(f: Callable) -> Callable:
    """`--junit-xml FILE`: the run as a JUnit report (one testcase per module, rule or tensor checked)."""
    from .ci.outcome import set_junit_path

    return click.option(
        "--junit-xml", type=click.Path(dir_okay=False), metavar="FILE", expose_value=False, callback=set_junit_path,
        help="Also write the checks as JUnit XML (one testcase per module, rule or tensor) for CI test reports.",
    )(f)  # fmt: skip
