"""Small worker pools we own, so each core runs one single-threaded torch computation.

Two shapes of parallel work:

- `BlockPool.each`: one tensor's blocks of rows, each worker taking the next as it
  finishes one (the merge: convert, matmul, add and round run on every core at once;
  a worker held up by the GIL or a noisy neighbour does fewer instead of being waited for).
- `run_ordered`: independent tasks (extract/resize modules) on N workers, at most N in
  flight, results yielded in task order so outputs are byte-identical for any N.

Torch's own intra-op pool is set to one thread while ours run (`single_threaded_torch`):
two pools sharing two cores thrash each other, and a fixed thread count keeps every
kernel's summation order, hence every output bit, independent of N.
"""

from __future__ import annotations

import gc
import itertools
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import TypeVar

from .. import trace

__all__ = [
    "usable_cores",
    "import_torch",
    "single_threaded_torch",
    "BlockPool",
    "Batch",
    "run_ordered",
    "wait_all",
    "one_torch_thread",
]

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _import_torch_single_threaded() -> bool:
    """Import torch (if not yet imported) with OpenMP's default team size at one; True if this call imported it.

    Cyclic GC is off during the import, and what the import created is then frozen (`gc.freeze`).

    OpenMP keeps the team size per thread, and every new thread starts from the process
    default: any thread that has not lowered it (torch's, MKL's, a helper's) would fork a
    team whose members spin-wait on cores others need, which on a loaded machine burns many
    times the real work. OMP_NUM_THREADS is read once, when torch loads OpenMP.
    """
    if "torch" in sys.modules:
        return False
    from .preload import finish

    finish()  # a background load of torch's libraries (`preload`) ends before the environment changes
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    collecting = gc.isenabled()
    gc.disable()  # the import creates ~10⁶ objects: collections during it find nothing and cost a sixth of it
    try:
        import torch  # noqa: F401
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved
        gc.freeze()  # torch's objects live until exit: no later collection (the one at exit included) walks them
        if collecting:
            gc.enable()
    return True


def import_torch():
    """The torch module, imported (if not yet) as `single_threaded_torch` imports it: without cyclic GC,
    its objects frozen after, OpenMP's default team at one; torch's intra-op threads then at the usable cores."""
    if _import_torch_single_threaded():
        sys.modules["torch"].set_num_threads(usable_cores())
    return sys.modules["torch"]


@contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Torch's intra-op thread count set to 1 for the duration, then restored (to the usable cores
    when torch was first imported here, as torch itself would have chosen)."""
    imported_here = _import_torch_single_threaded()
    import torch

    previous = usable_cores() if imported_here else torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_torch_thread() -> None:
    """Give the calling thread one torch intra-op thread (a new thread starts with the process default).

    The thread count is per thread under OpenMP: helper threads must set it themselves,
    or each would fork a team of its own on cores already busy, and sum in another order.
    """
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def yield_to_compute() -> None:
    """Lower the calling thread's priority as far as it goes (nice 19; on Linux, per thread).

    For work beside the compute that nothing waits for until the end (the copied tensors'
    checks): it then runs in the moments a core is left idle (between two tensors), or
    alone once the compute is done, instead of taking a third of two busy cores.
    """
    with suppress(AttributeError, OSError):  # no setpriority, or not a thread id (not Linux)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def wait_all(futures: Iterable[Future]) -> list:
    """Every future's result, waiting for all of them even when one failed (then re-raising the first error)."""
    results, error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as exc:  # noqa: BLE001 - re-raised below once every worker has stopped
            error = error or exc
            results.append(None)
    if error is not None:
        raise error
    return results


class BlockPool:
    """Runs `fn(worker, index)` over the blocks of a tensor (`each`), each worker taking the next block in turn.

    The calling thread is worker 0, so `workers` threads compute in all (`workers - 1`
    helpers). `each` returns only once every worker has stopped, also when one call
    fails: the blocks often write into a file or mapping that is closed right after.
    `start` begins a tensor's blocks on the helpers and returns at once (`Batch`), so
    the calling thread can prepare the next tensor, or finish the last, meanwhile.
    """

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._helpers = (
            ThreadPoolExecutor(
                self.workers - 1, "loratool-rows", initializer=_start_helper, initargs=(itertools.count(1),)
            )
            if self.workers > 1
            else None
        )

    def each(self, count: int, fn: Callable[[int, int], R]) -> list[R]:
        """`fn(worker, index)` for every index below `count`, in index order, results in index order.

        Each worker takes the next index as it finishes one, so a worker held up (by the GIL, by a noisy
        neighbour) does fewer instead of keeping the others waiting at the end. Which worker ran an index
        must not change its result: `fn` uses only that worker's own buffers. When one call fails, no worker
        starts another, and the first error is raised once every worker has stopped.
        """
        if self._helpers is None or min(self.workers, count) <= 1:
            with trace.span("row blocks", f"worker 0: {count} blocks"):
                return [fn(0, index) for index in range(count)]
        batch = self.start(count, fn)
        try:
            batch.help()
        finally:
            batch.wait()
        return batch.results

    def start(self, count: int, fn: Callable[[int, int], R], after: Batch | None = None) -> Batch:
        """Start `fn`'s blocks on the helpers (each begins once done with the batches started before);
        the caller joins in with `help` and collects with `wait`. `after`: the batch started before
        this one; if it fails, this one starts no block either."""
        return Batch(self, count, fn, after)

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BlockPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_helper = threading.local()


def _start_helper(numbers: Iterator[int]) -> None:
    """A pool's helper thread: one torch thread, and its worker number for good (its own buffers)."""
    one_torch_thread()
    _helper.worker = next(numbers)


class Batch:
    """One tensor's blocks, running on a pool's helpers (`BlockPool.start`).

    A worker number names a thread (and the buffers it computes in), not a task: with batches
    queued behind each other, a helper may take up a later batch while another still runs an
    earlier one, and each computes as itself.
    """

    def __init__(self, pool: BlockPool, count: int, fn: Callable[[int, int], R], after: Batch | None) -> None:
        self.count, self.results = count, [None] * count
        self._fn, self._claimed = fn, itertools.count()
        self.failed = threading.Event()
        self._stops = (self.failed,) if after is None else (self.failed, after.failed)
        helpers = pool._helpers
        workers = min(pool.workers, count) if helpers is not None else 1
        self._futures = [helpers.submit(self._help) for _ in range(1, workers)]

    def _help(self) -> None:
        self._run(_helper.worker)

    def _run(self, worker: int) -> None:
        with trace.span("row blocks", f"worker {worker}: dealt one at a time"):
            while not any(stop.is_set() for stop in self._stops) and (index := next(self._claimed)) < self.count:
                try:  # next() is atomic under the GIL
                    self.results[index] = self._fn(worker, index)
                except BaseException:
                    self.failed.set()
                    raise

    def help(self) -> None:
        """Take blocks as worker 0 (the calling thread) until none is left to take."""
        self._run(0)

    def stop(self) -> None:
        """Start no further block (the ones running finish); `wait` then returns at once after them."""
        self.failed.set()

    def wait(self) -> list:
        """Return the results once every helper is done with this batch; raise the first helper's error."""
        wait_all(self._futures)
        return self.results


def run_ordered(tasks: Iterable[T], fn: Callable[[T], R], workers: int, ahead: int | None = None) -> Iterator[R]:
    """`fn(task)` for every task on `workers` threads, yielded in task order.

    At most `workers` tasks run at once, so working memory stays at about `workers` × the
    largest task; up to `ahead` (default `workers`) tasks are submitted past the oldest
    unfinished one, so a worker done with a small task starts the next instead of idling
    behind a large one (their results, often small, wait to be yielded). With one worker
    everything runs on the calling thread. Stopping the iteration early cancels what has
    not started and waits for what has.

    Example:
        >>> list(run_ordered(range(5), lambda x: x * x, workers=3))
        [0, 1, 4, 9, 16]
    """
    if workers <= 1:
        for task in tasks:
            yield fn(task)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(workers, "loratool-worker", initializer=one_torch_thread) as executor:
        try:
            for task in tasks:
                pending.append(executor.submit(fn, task))
                if len(pending) >= max(workers, ahead or 0):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
