"""The `loratool` group: every error mapped to its exit code in one place, the commands, the entry point."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import traceback
from contextlib import suppress

import click

from ..errors import EXIT_INTERNAL, Interrupted, LoraToolError, os_error_problem
from ..version import __version__
from . import adapters, hub, inspecting, merging
from .ci.outcome import ci_outputs
from .console import EXIT_STDOUT_CLOSED, detach_stdout, set_color, stdout_reader_gone
from .help import GroupedCommand
from .running import fail, print_hub_notes

__all__ = ["cli", "main"]


class _Terminated(BaseException):
    """What the SIGTERM handler raises: a BaseException, as KeyboardInterrupt is for SIGINT, so that no
    `except Exception` on its way takes it for a failure of its own (`threading.Thread.start`'s, met
    between starting a thread and seeing it run, then un-registers the thread that is starting)."""


def _raise_on_sigterm(signum, frame):
    raise _Terminated


class LoraToolGroup(click.Group):
    """A group that maps every error to its exit code and a one-line message."""

    command_class = GroupedCommand

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _main_thread() else None
        _ignore_file_size_signal()
        _debug_log()
        print_hub_notes()
        with ci_outputs(ctx):
            return self._invoke_mapping_errors(ctx, previous)

    def _invoke_mapping_errors(self, ctx: click.Context, previous):
        try:
            return super().invoke(ctx)
        except LoraToolError as exc:
            if os.environ.get("LORATOOL_DEBUG"):
                traceback.print_exc()
            fail(ctx, str(exc), exc.exit_code)
        except KeyboardInterrupt:
            if os.environ.get("LORATOOL_DEBUG"):
                traceback.print_exc()
            fail(ctx, "interrupted by SIGINT; temporary output removed", 130)
        except _Terminated:
            if os.environ.get("LORATOOL_DEBUG"):
                traceback.print_exc()
            stopped = Interrupted("SIGTERM", 143)
            fail(ctx, str(stopped), stopped.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as exc:  # the machine (full disk, read-only folder …) or a bug: say which
            if isinstance(exc, BrokenPipeError) and stdout_reader_gone():  # `loratool env | head -1`
                detach_stdout()
                ctx.exit(EXIT_STDOUT_CLOSED)
            problem = os_error_problem(exc)
            if problem is not None:
                if os.environ.get("LORATOOL_DEBUG"):
                    traceback.print_exc()
                fail(ctx, str(problem), problem.exit_code)
            if os.environ.get("LORATOOL_DEBUG"):
                raise
            fail(
                ctx,
                f"internal error: {type(exc).__name__}: {exc} (rerun with LORATOOL_DEBUG=1 for a traceback, "
                "and please report it)",
                EXIT_INTERNAL,
            )
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _ignore_file_size_signal() -> None:
    """Past `ulimit -f` a write then fails with EFBIG (reported as exit 4) instead of SIGXFSZ killing us.

    CPython already ignores SIGXFSZ at start-up; an embedding program may not.
    """
    if hasattr(signal, "SIGXFSZ") and _main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _debug_log() -> None:
    """With LORATOOL_DEBUG set, the library's debug lines (e.g. how output space was reserved) go to stderr."""
    import logging

    class StderrHandler(logging.StreamHandler):
        stream = property(lambda self: sys.stderr, lambda self, value: None)  # whatever stderr is at the time

    logger = logging.getLogger("lora_tools")
    if os.environ.get("LORATOOL_DEBUG") and not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@click.group(cls=LoraToolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loratool")
@click.option(
    "--color",
    type=click.Choice(["auto", "always", "never"]),
    default="auto",
    show_default=True,
    help="Colour on stderr; auto follows the terminal, NO_COLOR and FORCE_COLOR.",
)
def cli(color: str) -> None:
    """Inspect, validate, merge, un-merge and extract LoRA adapters.

    Streams one tensor at a time, merges in fp32 with a single rounding, and
    writes outputs atomically. Set LORATOOL_DEBUG=1 for tracebacks; attach the
    output of `loratool env` to bug reports.
    """
    set_color(color)


for _family in (inspecting, merging, adapters, hub):
    for _name in _family.__all__:
        cli.add_command(getattr(_family, _name))


def main() -> None:
    """Console-script entry point: run the command, then end the process without tearing Python down.

    Once torch is imported, the interpreter's teardown (freeing every module's objects, then
    libtorch's static destructors) takes about a second on this machine, after every output is
    complete, closed and in place. So, as the interpreter would, the process waits for its
    threads (`threading._shutdown`) and runs the atexit handlers, flushes stdout and stderr,
    and then exits with the command's status at once. An exception that escapes (only with
    LORATOOL_DEBUG=1) ends the process the usual way, with its traceback.
    """
    try:
        cli.main(prog_name="loratool")
    except SystemExit as done:  # click ends a --help or --version cut short by `| head` with 1: say 141 too
        _end_process(EXIT_STDOUT_CLOSED if done.code == 1 and stdout_reader_gone() else done.code)


def _end_process(code) -> None:
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (`| head`): nothing more can reach it
            stream.flush()
    os._exit(code or 0)
