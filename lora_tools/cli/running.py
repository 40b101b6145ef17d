"""What the commands do around their library call: quiet the Hub, start loading torch, push, fail."""

from __future__ import annotations

import os
import sys

import click

from .console import stderr_console

__all__ = ["fail", "silence_hub_progress", "before_computing", "PUSH_KEYS", "pop_push_settings", "publish"]


def fail(ctx: click.Context, message: str, code: int) -> None:
    """Print `error: message` (annotated inside GitHub Actions) and end the command with `code`."""
    from .ci.outcome import error

    error(message)
    ctx.exit(code)


def silence_hub_progress(quiet: bool) -> None:
    if quiet:
        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":  # `launch` sets it before a load starts
            from ..compute.preload import finish

            finish()  # nothing may change the environment while torch's libraries load
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


def before_computing(quiet: bool, load_torch: bool = True) -> None:
    """Silence the Hub's progress bars (an environment variable), then start loading torch's libraries
    on another core while the inputs are read, unless `launch` started it already: in that order, as
    nothing may change the environment while that load runs (`compute.preload`)."""
    silence_hub_progress(quiet)
    if load_torch:
        from ..compute.preload import start

        start()


PUSH_KEYS = ("push_to_hub", "private", "push_branch", "create_pr", "commit_message")


def pop_push_settings(options: dict) -> dict:
    """Take the --push-to-hub options out of a command's options."""
    return {key: options.pop(key) for key in PUSH_KEYS}


def publish(output: str, options: dict, token: str | None, as_json: bool) -> dict | None:
    """Push a finished output when --push-to-hub was given; return the push report as a dict."""
    repo_id = options.pop("push_to_hub")
    private, branch = options.pop("private"), options.pop("push_branch")
    create_pr, message = options.pop("create_pr"), options.pop("commit_message")
    if repo_id is None:
        return None
    from ..commands.push import push as run_push

    report = run_push(
        output, repo_id, private=private, revision=branch, create_pr=create_pr, commit_message=message, token=token
    )
    if not as_json:
        where = report.pull_request_url or report.commit_url
        stderr_console().print(f"pushed {output} to {report.repo_id}: {where}")
    return report.to_dict()
