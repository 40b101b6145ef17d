"""What the commands do around their library call: quiet the Hub, start loading torch, push, fail."""

from __future__ import annotations

import os
import sys

import click

from .console import stderr_console

__all__ = [
    "fail",
    "print_hub_notes",
    "pushed_line",
    "silence_hub_progress",
    "before_computing",
    "PUSH_KEYS",
    "pop_push_settings",
    "publish",
]


def fail(ctx: click.Context, message: str, code: int) -> None:
    """Print `error: message` (annotated inside GitHub Actions) and end the command with `code`."""
    from .ci.outcome import error

    error(message)
    ctx.exit(code)


def print_hub_notes() -> None:
    """Each Hub retry (and cached file downloaded again) is one line on stderr, --quiet or not: never silent."""
    from ..io.hub_retry import set_retry_reporter

    set_retry_reporter(lambda line: click.echo(line, err=True))


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
        stderr_console().print(pushed_line(output, report))
    return report.to_dict()


def pushed_line(folder, report) -> str:
    """`pushed X to org/name: URL`, with what was sent when a push sent less than everything or made several commits."""
    where = report.pull_request_url or report.commit_url
    if report.commits == 0:
        return f"{folder} is already on {report.repo_id} (nothing sent): {where}"
    sent = f"{len(report.files_sent)} file(s) in {report.commits} commit(s)"
    unchanged = f", {report.files_unchanged} already there" if report.files_unchanged else ""
    return f"pushed {folder} to {report.repo_id} ({sent}{unchanged}): {where}"
