"""Where independent tasks run: threads on this machine (`local`) or tasks on a Ray cluster (`ray`).

The engines plan on the driver and hand their independent pieces (extract, resize, combine and
stats modules; merge output shards) to `Executor.map`, which yields the results in task order, so
the output is the same bytes whichever executor ran it and however many nodes took part. All of
Ray lives in this module.

On Ray, the pieces are grouped into tasks of about `task_bytes` input bytes (tiny modules do not
each pay a task's overhead), at most two tasks per cluster core are in flight (the driver's memory
stays bounded whatever the model's size), each task takes one core and computes single-threaded
(as a local worker does: the same summation order, hence the same bits), and tasks are spread over
the nodes. A task whose node or worker dies is retried by Ray (`max_retries`); an error of ours in
a task is not retried: it comes back to the driver, which stops every other task and raises it as
the local run would have.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import EnvironmentProblem, InvalidInputError, LoraToolError, os_error_problem

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "executor_for", "batches"]

T = TypeVar("T")
R = TypeVar("R")

#: The executors `--executor` accepts.
EXECUTORS = ("local", "ray")
#: Input bytes gathered into one Ray task (modules are grouped until they reach it).
TASK_BYTES = 256 << 20
#: Ray's retries of a task whose worker or node died (Ray's own default is 3).
RETRIES = 3
_INSTALL = "pip install 'lora_tools[ray]'"


class Executor:
    """Runs `fn(task, workspace)` over independent tasks and yields the results in task order.

    `name` is "local" or "ray"; `nodes` is how many machines ran tasks (known once `map` is done).
    Used as a context manager around every `map`.
    """

    name = "local"
    nodes = 1

    def map(self, fn: Callable[[T, Any], R], tasks: Sequence[T], size: Callable[[T], int] | None = None) -> Iterator[R]:
        raise NotImplementedError

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        return None


class LocalExecutor(Executor):
    """This machine's worker threads (`compute.workers.ModuleWorkers`): one core or device each."""

    def __init__(self, devices: Sequence[Any], workers: int | None = None) -> None:
        from .workers import ModuleWorkers

        self._workers = ModuleWorkers(devices, workers)
        self.workers = self._workers.workers

    def __enter__(self) -> LocalExecutor:
        self._workers.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._workers.__exit__(*exc)

    def map(self, fn, tasks, size=None):
        return self._workers.map(fn, tasks)


def batches(tasks: Sequence[T], size: Callable[[T], int] | None, limit: int) -> list[list[T]]:
    """Consecutive tasks grouped until a group's size reaches `limit` (every group holds at least one task).

    Example:
        >>> batches([5, 5, 20, 1, 1], lambda n: n, 10)
        [[5, 5], [20], [1, 1]]
    """
    groups: list[list[T]] = []
    current: list[T] = []
    total = 0
    for task in tasks:
        current.append(task)
        total += size(task) if size is not None else limit
        if total >= limit:
            groups.append(current)
            current, total = [], 0
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class _Failure:
    """An error of ours raised in a task, carried back as data (its class and one-line message)."""

    kind: type
    message: str

    def raise_it(self) -> None:
        error = self.kind.__new__(self.kind)
        Exception.__init__(error, self.message)
        raise error


#: How long a RAY_ADDRESS is given to accept a connection before `ray.init`, which would retry for minutes.
PROBE_SECONDS = 5.0


def _refuse_unreachable(address: str | None) -> None:
    """Refuse a `host:port` (or `ray://host:port`) RAY_ADDRESS that nothing answers at, within `PROBE_SECONDS`.

    `ray.init` keeps retrying such an address for minutes; a CI job should hear at once that the cluster is
    not there. "auto", "local" and an unset address are left to Ray.
    """
    import socket

    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as error:
        raise EnvironmentProblem(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address}: nothing answers at {host}:{port} "
            f"({error.strerror or type(error).__name__}); start it (ray start --head) or unset RAY_ADDRESS "
            "for a local Ray"
        ) from None


class RayExecutor(Executor):
    """Tasks on a Ray cluster: the one at `RAY_ADDRESS` (or a Ray already initialised), else a local Ray.

    Every node must see the inputs and the output's folder at the same paths (a shared
    filesystem), and have lora_tools installed. `device` is resolved on each worker ("cpu"
    there unless the driver asked for a GPU: then each task also asks Ray for one).
    """

    name = "ray"

    def __init__(self, device: str = "cpu", task_bytes: int = TASK_BYTES, retries: int = RETRIES) -> None:
        self.device, self.task_bytes, self.retries = device, task_bytes, retries
        self.nodes = 0
        self._seen: set[str] = set()
        self._started_here = False
        self._ray = None
        self._pending: deque = deque()

    def __enter__(self) -> RayExecutor:
        try:
            import ray
        except ImportError:
            raise EnvironmentProblem(f"--executor ray needs Ray, which is not installed: {_INSTALL}") from None
        if not ray.is_initialized():
            address = os.environ.get("RAY_ADDRESS")
            _refuse_unreachable(address)
            try:
                ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as error:
                where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
                raise EnvironmentProblem(f"cannot start or reach {where}: {error}") from None
            self._started_here = True
        self._ray = ray
        return self

    def __exit__(self, *exc) -> None:
        """Stop what still runs (after an error, tasks may be writing into the output), then leave the cluster."""
        self._stop()
        if self._started_here:
            self._ray.shutdown()

    def map(self, fn, tasks, size=None):
        ray = self._ray
        gpus = 0 if self.device in ("cpu", "auto") else 1
        remote = ray.remote(_run_batch).options(
            num_cpus=1, num_gpus=gpus, max_retries=self.retries, retry_exceptions=False, scheduling_strategy="SPREAD"
        )
        fn_ref = ray.put(fn)  # sent to each node once, not with every task
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        pending = self._pending
        try:
            for group in batches(list(tasks), size, self.task_bytes):
                pending.append(remote.remote(fn_ref, group, self.device))
                if len(pending) >= window:
                    yield from self._collect(pending.popleft())
            while pending:
                yield from self._collect(pending.popleft())
        except BaseException:
            self._stop()
            raise

    def _collect(self, ref) -> list:
        from ray.exceptions import RayError, RayTaskError

        try:
            node, results = self._ray.get(ref)
        except RayTaskError as error:  # a bug of ours in the task: its own exception and traceback
            raise error.as_instanceof_cause() from None
        except RayError as error:  # retries spent: workers or nodes kept dying
            raise EnvironmentProblem(f"a Ray task failed after {self.retries} retries: {error}") from None
        self._seen.add(node)
        self.nodes = len(self._seen)
        if isinstance(results, _Failure):
            results.raise_it()
        return results

    def _stop(self) -> None:
        """Cancel the tasks not yet done and wait until none runs (they may be writing into the output)."""
        pending, self._pending = list(self._pending), deque()
        for ref in pending:
            self._ray.cancel(ref)
        if pending:
            self._ray.wait(pending, num_returns=len(pending), timeout=600)


_workspaces: dict[str, Any] = {}


def _run_batch(fn, tasks: list, device: str) -> tuple[str, list | _Failure]:
    """A Ray task: `fn(task, workspace)` for each task, single-threaded, in this worker's reused workspace.

    Returns this node's id and the results, or the `_Failure` of the first error of ours.
    """
    import ray

    from .device import resolve_devices
    from .pool import single_threaded_torch

    node = ray.get_runtime_context().get_node_id()
    with single_threaded_torch():
        workspace = _workspaces.get(device)
        if workspace is None:
            from .workspace import Workspace

            workspace = _workspaces[device] = Workspace(resolve_devices(device)[0])
        results = []
        for task in tasks:
            try:
                results.append(fn(task, workspace))
            except LoraToolError as error:
                return node, _Failure(type(error), str(error))
            except OSError as error:  # the node's disk or files (full, read-only …): reported as locally
                problem = os_error_problem(error)
                if problem is None:
                    raise
                return node, _Failure(type(problem), str(problem))
    return node, results


def executor_for(executor: str | Executor, devices: Sequence[Any], workers: int | None = None) -> Executor:
    """The executor a command asked for: "local" (worker threads over `devices`), "ray", or one given ready-made."""
    if isinstance(executor, Executor):
        return executor
    if executor == "local":
        return LocalExecutor(devices, workers)
    if executor == "ray":
        if workers is not None:
            raise InvalidInputError("--workers is for --executor local; a Ray cluster runs one task per core")
        kind = devices[0].type
        return RayExecutor("cpu" if kind == "cpu" else kind)
    raise InvalidInputError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
