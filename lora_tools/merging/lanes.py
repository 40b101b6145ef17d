"""Compute devices as lanes: each with its buffers and its row pool (CPU) or staging pipeline (CUDA)."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from ..io.checkpoint import Checkpoint

__all__ = ["Lane", "deal", "no_cyclic_gc"]


class Lane:
    """One compute device: its buffers, its row pool (CPU) or its staging pipeline (CUDA)."""

    def __init__(self, device, workers: int) -> None:
        from ..compute.pool import BlockPool
        from ..compute.streams import Stager, streams_for
        from ..compute.workspace import Workspace

        self.device = device
        self.workspace = Workspace(device)
        streams = streams_for(device)
        self.stager = Stager(streams) if streams is not None else None
        self.pool = BlockPool(workers) if device.type == "cpu" else None
        self._staged: dict = {}

    def take(self, base: Checkpoint, name: str):
        """The tensor `name`, staged on this device (the first call stages it; later ones were staged ahead)."""
        staged = self._staged.pop((id(base), name), None) or self.stager.stage(lambda: base.mapped(name))
        return self.stager.take(staged)

    def stage_ahead(self, base: Checkpoint, name: str) -> None:
        if self.stager is not None and (id(base), name) not in self._staged:  # names repeat across components
            self._staged[id(base), name] = self.stager.stage(lambda: base.mapped(name))

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()
        if self.pool is not None:
            self.pool.close()


def deal(lanes: list, work: list, compute) -> list:
    """Deal tasks to lanes largest first (each to the least loaded), run the lanes at once; results in task order."""
    load = [0] * len(lanes)
    assigned: list[list[int]] = [[] for _ in lanes]
    for index in sorted(range(len(work)), key=lambda i: (-work[i][1].nbytes, i)):
        lane = min(range(len(lanes)), key=lambda k: (load[k], k))
        assigned[lane].append(index)
        load[lane] += work[index][1].nbytes
    results: list = [None] * len(work)

    def run_lane(number: int) -> None:
        if lanes[number].device.type == "cuda":
            import torch

            torch.cuda.set_device(lanes[number].device)  # this thread's current stream is on its device
        mine = sorted(assigned[number])
        for position, index in enumerate(mine):
            upcoming = work[mine[position + 1]] if position + 1 < len(mine) else None
            results[index] = compute(lanes[number], *work[index], upcoming)

    from ..compute.pool import one_torch_thread, wait_all

    with ThreadPoolExecutor(len(lanes), thread_name_prefix="loratool-device", initializer=one_torch_thread) as executor:
        wait_all([executor.submit(run_lane, number) for number in range(len(lanes))])
    return results


@contextmanager
def no_cyclic_gc():
    """No cyclic garbage collection while streaming: tensors are freed by reference counting, and each
    collection would walk the millions of objects importing torch created (a tenth of the CPU time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
