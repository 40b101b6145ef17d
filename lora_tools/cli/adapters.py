"""The commands that write adapters: `extract`, `resize`, `combine`, `convert`."""

from __future__ import annotations

import click

from .console import count_progress
from .help import GroupedCommand
from .options import (
    device_option,
    dtype_option,
    executor_option,
    hub_input_options,
    json_option,
    output_options,
    plot_option,
    push_options,
    rank_options,
    workers_option,
)
from .render.reports import render_combination, render_extraction
from .running import before_computing, pop_push_settings, publish, silence_hub_progress

__all__ = ["extract", "resize", "combine", "convert"]


@click.command(cls=GroupedCommand)
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
@executor_option
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
    from ..commands.extract import extract as run_extract

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    before_computing(quiet)
    push_settings = pop_push_settings(options)
    output, plot = options.pop("output"), options.pop("plot")
    with count_progress(quiet, "extract") as progress:
        report = run_extract(base, tuned, output, progress=progress, **options)
    if plot:
        from ..analysis.plot import plot_extraction

        plot_extraction(report, plot)
    render_extraction(report, as_json, publish(output, push_settings, options["token"], as_json))


@click.command(cls=GroupedCommand)
@click.argument("adapter", type=click.Path())
@rank_options
@device_option
@workers_option
@executor_option
@output_options
@json_option
@hub_input_options
@push_options
def resize(adapter: str, **options) -> None:
    """Change an adapter's rank: the best rank-k approximation of each module's ΔW.

    Exact (QR of B and Aᵀ, SVD of the r×r core); each module's scale is kept.
    """
    from ..commands.resize import resize as run_resize

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    before_computing(quiet)
    push_settings = pop_push_settings(options)
    output = options.pop("output")
    with count_progress(quiet, "resize") as progress:
        report = run_resize(adapter, output, progress=progress, **options)
    render_extraction(report, as_json, publish(output, push_settings, options["token"], as_json))


@click.command(cls=GroupedCommand)
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
@workers_option
@executor_option
@output_options
@json_option
@hub_input_options
@push_options
def combine(adapters: tuple[str, ...], **options) -> None:
    """Combine ADAPTERS into one adapter: ΔW = Σ wᵢ·ΔWᵢ per module (cat), or its best rank-k (svd).

    ties, dare-linear, dare-ties and magnitude-prune apply PEFT's definitions to
    each full ΔWᵢ, then re-factorise like svd (default rank: the largest input rank).
    """
    from ..commands.combine import combine as run_combine

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    before_computing(quiet)
    push_settings = pop_push_settings(options)
    output = options.pop("output")
    with count_progress(quiet, "combine") as progress:
        report = run_combine(list(adapters), output, progress=progress, **options)
    render_combination(report, as_json, publish(output, push_settings, options["token"], as_json))


@click.command(cls=GroupedCommand)
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
@click.option("--energy", type=float, help="Instead of --rank: keep this fraction of each re-factorised ΔW's energy.")
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
    from ..commands.convert import convert as run_convert

    as_json, quiet = options.pop("as_json"), options.pop("quiet")
    silence_hub_progress(quiet)
    report = run_convert(adapter, options.pop("output"), **options)
    render_extraction(report, as_json)
