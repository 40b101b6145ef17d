"""The `loratool` console script and `python -m lora_tools`: start what a computing command needs, then run the CLI.

A command that computes (merge, unmerge, extract, resize, combine) imports torch once
it has planned, and about a fifth of that import is the dynamic loader mapping torch's
libraries, which needs no Python. `compute.preload` runs that part on another core;
started here, it begins before the CLI's own modules (click, rich, the planners) are
imported, so it is over by the time the import of torch needs it.

Only the command's name and two flags are read here; click parses the command line as
always. A command line read wrongly here costs time, never a result: the load then
starts later (from `cli.running.before_computing`) or runs for nothing.
"""

from __future__ import annotations

import os
import sys

__all__ = ["computes", "main"]

#: The commands that import torch to compute, unless given --dry-run or --help.
COMPUTING = frozenset({"merge", "unmerge", "extract", "resize", "combine"})
#: The group's options that take a value (given as two words or as --name=value).
_GROUP_VALUES = frozenset({"--color"})
_NO_COMPUTE = frozenset({"--dry-run", "-h", "--help"})


def computes(arguments: list[str]) -> bool:
    """Whether this command line runs a command that will compute (so will import torch)."""
    words = iter(arguments)
    for word in words:
        if word in _GROUP_VALUES:
            next(words, None)
        elif word.split("=", 1)[0] in _GROUP_VALUES:
            continue
        elif word.startswith("-"):
            return False  # --version, --help, or an option read by click alone
        else:
            return word in COMPUTING and _NO_COMPUTE.isdisjoint(words)
    return False


def main() -> None:
    """Start loading torch's libraries for a computing command, then run the CLI (`cli.main`)."""
    arguments = sys.argv[1:]
    if computes(arguments):
        if "-q" in arguments or "--quiet" in arguments:
            # set before the load starts: nothing may change the environment while it runs
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from .compute.preload import start

        start()
    from .cli import main as run

    run()
