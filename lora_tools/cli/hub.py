"""`push`: publish a folder to the Hugging Face Hub, resuming where a failed push stopped."""

from __future__ import annotations

import click

from .console import stderr_console
from .help import GroupedCommand
from .options import json_option
from .render.reports import print_json
from .running import pushed_line, silence_hub_progress

__all__ = ["push"]


@click.command(cls=GroupedCommand)
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
    """Publish FOLDER (made earlier by loratool or not) to the Hub repo REPO_ID.

    Creates the repo if needed and sends only the files the branch does not
    already hold: running a push that failed again finishes it. Two or more
    weight files go one commit each, then the rest. Hub requests are retried
    for up to LORATOOL_HUB_RETRY_SECONDS (default 300). The token comes from
    --token, HF_TOKEN or the huggingface_hub login file and is never printed.
    """
    from ..commands.push import push as run_push

    silence_hub_progress(quiet)
    report = run_push(
        folder, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
        token=token,
    )  # fmt: skip
    if as_json:
        print_json(report.to_dict())
    else:
        stderr_console().print(pushed_line(folder, report))
