"""Where the CLI's human-readable output goes: one rich console on stderr, set up for the reader.

On a terminal, rich draws tables, colours and an animated progress bar. Anywhere else (a pipe,
a CI log, a file) lines are never wrapped, carry no colour codes unless colour is forced, and
progress is a plain line every tenth of the work or every 30 seconds, so that every line a CI
user greps is whole.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

__all__ = [
    "set_color",
    "stderr_console",
    "is_interactive",
    "byte_progress",
    "count_progress",
    "plain_progress",
    "stdout_reader_gone",
    "EXIT_STDOUT_CLOSED",
    "detach_stdout",
]

#: "auto" (rich decides from the terminal and NO_COLOR / FORCE_COLOR), "always" or "never".
_COLOR = {"mode": "auto"}
#: Width used off a terminal: wide enough that no summary or table is ever folded.
_UNWRAPPED_WIDTH = 100_000
#: Exit status when the reader of stdout went away (`loratool env | head -1`): 128 + SIGPIPE, the status
#: a shell reports for `seq`, `cat` or git ended by that signal, so `set -o pipefail` sees the same.
EXIT_STDOUT_CLOSED = 141


def set_color(mode: str) -> None:
    """Choose colour for this process: auto, always or never (`--color` on the command line)."""
    _COLOR["mode"] = mode


def is_interactive() -> bool:
    """True when stderr is a terminal a person watches (so animation and wrapping are welcome)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def stderr_console():
    """A rich console on stderr: wrapping and animation on a terminal, whole plain lines elsewhere."""
    from rich.console import Console

    mode = _COLOR["mode"]
    interactive = is_interactive()
    force = {"always": True, "never": False}.get(mode)
    styles = {"color_system": None} if mode == "never" else {}  # never: not even bold
    if interactive:
        return Console(stderr=True, force_terminal=force, **styles)
    return Console(
        stderr=True,
        force_terminal=force,
        **styles,
        soft_wrap=True,
        width=_UNWRAPPED_WIDTH,
        highlight=False,
        emoji=False,
    )


def stdout_reader_gone() -> bool:
    """True when stdout is a pipe or socket whose reader has closed it (writing there fails with EPIPE).

    Asked of the descriptor itself (poll reports POLLERR on a pipe with no reader), so a broken pipe
    elsewhere (a network connection) is never mistaken for the end of our own output.
    """
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False


def detach_stdout() -> None:
    """Point stdout at /dev/null, so that nothing still buffered fails again at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def plain_progress(description: str, render: Callable[[int, int | None], str], *, every: float = 30.0):
    """A (done, total) callback printing one plain line per tenth of the work or per `every` seconds."""
    state = {"tenth": -1, "last": time.monotonic()}

    def update(done: int, total: int | None) -> None:
        now = time.monotonic()
        tenth = int(10 * done / total) if total else -1
        due = (total and tenth > state["tenth"]) or now - state["last"] >= every
        if not due:
            return
        state["tenth"], state["last"] = max(tenth, state["tenth"]), now
        print(f"{description}: {render(done, total)}", file=sys.stderr, flush=True)

    return update


def _bytes_line(done: int, total: int | None) -> str:
    from ..units import format_bytes

    if not total:
        return format_bytes(done)
    return f"{format_bytes(done)} of {format_bytes(total)} ({100 * done // total}%)"


def _count_line(done: int, total: int | None) -> str:
    return f"{done} of {total} ({100 * done // total}%)" if total else str(done)


@contextmanager
def _progress(quiet: bool, description: str, render, columns: tuple):
    """A (done, total) callback: None when quiet, plain lines off a terminal, else a rich bar with `columns`."""
    if quiet:
        yield None
        return
    if not is_interactive():
        yield plain_progress(description, render)
        return
    from rich.progress import Progress

    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def byte_progress(quiet: bool, description: str):
    """A context yielding a (done_bytes, total_bytes) callback: a rich bar on a terminal, plain lines elsewhere."""
    columns: tuple = ()
    if not quiet and is_interactive():
        from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())  # fmt: skip
    return _progress(quiet, description, _bytes_line, columns)


def count_progress(quiet: bool, description: str):
    """A context yielding a (done, total) callback over modules: a rich bar on a terminal, plain lines elsewhere."""
    return _progress(quiet, description, _count_line, ())
