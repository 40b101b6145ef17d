"""Module-level parallelism for extract, resize and convert: N workers, each with its own device and buffers."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, TypeVar

from ..errors import InvalidInputError
from .pool import run_ordered, single_threaded_torch, usable_cores

__all__ = ["ModuleWorkers", "default_workers"]

T = TypeVar("T")
R = TypeVar("R")


def default_workers(devices: Sequence[Any], workers: int | None) -> int:
    """`workers` checked, or the default: the usable cores on the CPU, one per device otherwise."""
    if workers is None:
        return usable_cores() if devices[0].type == "cpu" else len(devices)
    if workers < 1:
        raise InvalidInputError(f"--workers {workers}: give at least 1")
    return workers


class ModuleWorkers:
    """Runs independent module tasks on N workers, results in task order.

    Each worker thread keeps one device (worker k takes device k mod the number of
    devices) and its own `Workspace`; on the CPU, torch's own thread pool is held at
    one thread meanwhile, so N workers use N cores and the bits do not depend on N.
    """

    def __init__(self, devices: Sequence[Any], workers: int | None = None) -> None:
        self.devices = list(devices)
        self.workers = default_workers(self.devices, workers)
        self._local = threading.local()
        self._numbers = itertools.count()
        self._stack = ExitStack()

    def __enter__(self) -> ModuleWorkers:
        if self.devices[0].type == "cpu":  # also with one worker, so the bits do not depend on the count
            self._stack.enter_context(single_threaded_torch())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _workspace(self):
        workspace = getattr(self._local, "workspace", None)
        if workspace is None:
            from .workspace import Workspace

            device = self.devices[next(self._numbers) % len(self.devices)]
            workspace = self._local.workspace = Workspace(device)
        return workspace

    def map(self, fn: Callable[[T, Any], R], tasks: Iterable[T]) -> Iterator[R]:
        """`fn(task, workspace)` for every task, yielded in task order (`workspace.device` is the worker's device).

        Twice as many tasks as workers are queued ahead: modules alternate large and small
        (MLP, attention), and a worker must not wait for a large one to be yielded.
        """
        return run_ordered(tasks, lambda task: fn(task, self._workspace()), self.workers, ahead=2 * self.workers)
