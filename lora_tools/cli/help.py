"""Help that reads well: options under headings, required ones first, and real examples.

Which heading an option sits under, and each command's examples, are data (the tables below),
so a new option or command only needs a line here; a test checks that no option is left
without a heading and that every command has an example.
"""

from __future__ import annotations

import click

__all__ = ["OPTION_GROUPS", "EXAMPLES", "GroupedCommand", "group_of"]

#: Headings in the order help shows them, each with the option names (Click's parameter names) under it.
OPTION_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Output", ("output", "force", "to", "naming", "dtype", "max_shard_size", "bake_alpha", "plot")),
    ("Input", ("base", "component", "alpha", "renames", "residual_base", "engine", "max_lora_rank")),
    ("Rank", ("rank", "energy", "sv_ratio", "max_rank")),
    ("Arithmetic", ("weights", "method", "density", "majority_sign", "seed", "embeddings", "save_1d")),
    ("Selection", ("include", "exclude", "skip_mismatched", "show_all", "stats", "no_spectrum")),
    ("Compute", ("device", "workers", "executor")),
    (
        "Checks",
        (
            "dry_run",
            "allow_unmatched",
            "allow_nonfinite",
            "drop_unsupported",
            "checksum",
            "expect_identical",
            "max_ulp",
        ),
    ),
    ("Reporting", ("as_json", "quiet", "junit_xml")),
    ("Hub", ("revision", "token", "push_to_hub", "private", "push_branch", "create_pr", "commit_message")),
)

_GROUP_OF = {name: heading for heading, names in OPTION_GROUPS for name in names}
_POSITION = {name: position for _, names in OPTION_GROUPS for position, name in enumerate(names)}

#: Two or three real invocations per command, shown at the end of its help.
EXAMPLES: dict[str, tuple[str, ...]] = {
    "inspect": (
        "loratool inspect fixtures/tiny-llama-lora --base fixtures/tiny-llama",
        "loratool inspect fixtures/tiny-llama --json",
        "loratool inspect my-org/my-lora --all",
        "loratool inspect fixtures/tiny-llama-lora --stats --base fixtures/tiny-llama --plot lora.png",
    ),
    "merge": (
        "loratool merge fixtures/tiny-llama fixtures/tiny-llama-lora -o merged",
        "loratool merge meta-llama/Llama-3.2-1B my-org/lora-a my-org/lora-b -w 1 -w 0.5 -o merged --dtype bf16",
        "loratool merge base adapter -o merged --json --checksum --push-to-hub my-org/merged",
        "loratool merge base my-lora -o merged --rename '^backbone\\.=model.'",
    ),
    "unmerge": (
        "loratool unmerge merged fixtures/tiny-llama-lora -o restored",
        "loratool unmerge my-org/merged my-org/lora -o restored --json",
    ),
    "extract": (
        "loratool extract base tuned -o adapter --rank 16",
        "loratool extract base tuned -o adapter --energy 0.99 --max-rank 64 --embeddings full",
    ),
    "resize": (
        "loratool resize adapter -o adapter-r8 --rank 8",
        "loratool resize adapter -o adapter-small --energy 0.99",
    ),
    "convert": (
        "loratool convert lora.safetensors --to peft --base stable-diffusion-folder -o peft-lora",
        "loratool convert peft-lora --to kohya -o lora.safetensors",
        "loratool convert flux-lora.safetensors --to kohya --naming original --base flux1-dev.safetensors -o bfl.safetensors",
        "loratool convert fixtures/tiny-llama-lora --to gguf --base fixtures/tiny-llama -o tiny-lora.gguf",
    ),
    "check": (
        "loratool check fixtures/tiny-llama-lora --for vllm --base fixtures/tiny-llama",
        "loratool check my-lora --for llama.cpp --json",
        "loratool check my-lora --for vllm --max-lora-rank 64",
    ),
    "validate": (
        "loratool validate fixtures/tiny-llama-lora --base fixtures/tiny-llama",
        "loratool validate adapters/*/adapter_config.json --base base --junit-xml validate.xml",
    ),
    "combine": (
        "loratool combine style character -w 1 -w -0.5 -o mix",
        "loratool combine style character -w 0.6 -w 0.4 --method svd --rank 4 -o mix-r4",
        "loratool combine a b c --method ties --density 0.2 --rank 8 -o mix-ties",
    ),
    "push": (
        "loratool push merged my-org/merged --private",
        'loratool push merged my-org/merged --create-pr --commit-message "merge v2"',
    ),
    "diff": (
        "loratool diff merged-yesterday merged-today --expect-identical",
        "loratool diff base merged --json --no-spectrum",
        "loratool diff base tuned --plot change.png",
    ),
    "env": (
        "loratool env",
        "loratool env --json",
    ),
}


def group_of(param: click.Parameter) -> str | None:
    """The heading an option belongs under, or None for one no table names (and for --help)."""
    return _GROUP_OF.get(param.name or "")


class GroupedCommand(click.Command):
    """A Click command whose help lists options under headings and ends with examples."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[tuple, tuple[str, str]]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is None:
                continue
            heading = group_of(param) or ("Help" if "--help" in param.opts else "Other options")
            # required options first, then the order of the table
            rank = (not param.required, _POSITION.get(param.name or "", len(_POSITION)))
            rows.setdefault(heading, []).append((rank, record))
        for heading in [heading for heading, _ in OPTION_GROUPS] + ["Other options", "Help"]:
            if heading in rows:
                with formatter.section(heading):
                    formatter.write_dl([record for _, record in sorted(rows[heading], key=lambda row: row[0])])

    def invoke(self, ctx: click.Context):
        ctx.meta.setdefault("lora_tools.arguments", {}).update(ctx.params)  # the inputs CI annotations point at
        return super().invoke(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        examples = EXAMPLES.get(self.name or "")
        if examples:
            with formatter.section("Examples"):
                for line in examples:  # never wrapped: a folded command line cannot be pasted
                    formatter.write(f"{'':>{formatter.current_indent}}$ {line}\n")
