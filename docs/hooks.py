"""mkdocs hooks: what the site generates at build time instead of keeping a copy that can go stale.

- The CLI reference page (`cli.md`) gets `loratool --help` and every `loratool COMMAND --help`, rendered by
  Click from `lora_tools.cli.cli` itself, where the page says `<!-- loratool-help -->`.
- Pictures kept with the benchmarks (outside `docs/pages`) are added to the site under `img/`.

Rendering the help must not import torch (the CLI promises a fast `--help`); if it does, the hook logs a
warning, which fails `mkdocs build --strict`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- loratool-help -->"
#: Files from the repository copied into the site: site path → repository path.
PICTURES = {
    "img/inspect-stats-tiny-llama.png": "benchmarks/pictures/inspect-stats-tiny-llama.png",
    "img/inspect-stats-32-layers.png": "benchmarks/pictures/inspect-stats-32-layers.png",
}
#: Commands in the order the guide presents them, each with the page that explains it.
GUIDES = {
    "inspect": ("inspect.md", "Inspect and validate"),
    "merge": ("merge.md", "Merge and unmerge"),
    "unmerge": ("merge.md", "Merge and unmerge"),
    "extract": ("extract.md", "Extract and resize"),
    "resize": ("extract.md", "Extract and resize"),
    "combine": ("combine.md", "Combine"),
    "convert": ("convert.md", "Convert"),
    "check": ("serving.md", "Serving"),
    "diff": ("stats.md", "Stats and diff"),
    "push": ("hub.md", "The Hugging Face Hub"),
    "env": ("bugs.md", "Reporting a bug"),
}
#: Help is wrapped for this terminal width whatever the building machine's terminal is.
WIDTH = 88

log = logging.getLogger("mkdocs.hooks.loratool")


def on_files(files: Files, config) -> Files:
    """Add the pictures kept under `benchmarks/` to the site."""
    for site_path, repo_path in PICTURES.items():
        files.append(File.generated(config, site_path, abs_src_path=str(REPO / repo_path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Render the CLI's help into the page that asks for it."""
    if MARKER not in markdown:
        return markdown
    torch_before = "torch" in sys.modules
    rendered = render_cli_help()
    if "torch" in sys.modules and not torch_before:
        log.warning("rendering `loratool --help` imported torch: the CLI's help must stay torch-free")
    return markdown.replace(MARKER, rendered)


def _cli() -> click.Group:
    """The CLI's root group, imported from the checkout this site is built from."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from lora_tools.cli import cli

    return cli


def command_names(cli: click.Group, ctx: click.Context) -> list[str]:
    """Every command, in the guide's order first, then any the guide does not list yet."""
    names = cli.list_commands(ctx)
    return [name for name in GUIDES if name in names] + [name for name in names if name not in GUIDES]


def render_cli_help() -> str:
    """Markdown for `loratool --help` and each `loratool COMMAND --help`, as Click prints them."""
    cli = _cli()
    root = click.Context(cli, info_name="loratool", terminal_width=WIDTH, max_content_width=WIDTH)
    sections = ["## loratool", "", "```text", cli.get_help(root).rstrip(), "```", ""]
    for name in command_names(cli, root):
        command = cli.get_command(root, name)
        ctx = click.Context(command, info_name=name, parent=root, terminal_width=WIDTH, max_content_width=WIDTH)
        sections += [f"## loratool {name}", ""]
        if name in GUIDES:
            page, title = GUIDES[name]
            sections += [f"Guide: [{title}]({page}).", ""]
        sections += ["```text", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(sections)
