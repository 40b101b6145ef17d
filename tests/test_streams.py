"""The staging pipeline (pinned buffers, side stream, events) run on the CPU through `CpuStreams`.

Every path of `Stager` and of the merge's staged lane runs here; only the CUDA calls
themselves (`CudaStreams`) need a GPU, and the CUDA oracle tests cover those.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from synthetic import write_llama_checkpoint, write_lora_adapter

import lora_tools
from lora_tools.compute import streams as streams_module
from lora_tools.compute.streams import CpuStreams, Stager


class _SlowStreams(CpuStreams):
    """Uploads that take a while, and can be held until released, to catch reuse and cancellation mistakes."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay, self.release, self.buffers, self.copying = delay, threading.Event(), 0, threading.Event()
        self.release.set()
        self.finished: list[int] = []

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return super().host_buffer(nbytes)

    def _copy(self, target: torch.Tensor, host: torch.Tensor) -> None:
        self.copying.set()
        self.release.wait(10)
        time.sleep(self.delay)
        target.copy_(host)
        self.finished.append(target.numel())


def _reader(tensor: torch.Tensor):
    @contextmanager
    def read():
        yield tensor

    return read


def test_staged_tensors_arrive_whole_through_two_reused_buffers():
    streams = _SlowStreams(delay=0.01)
    stager = Stager(streams)
    sources = [torch.arange(1000, dtype=torch.float32) * (k + 1) for k in range(6)]
    try:
        # stage far ahead: a buffer may only be refilled once its previous upload finished
        staged = [stager.stage(_reader(t)) for t in sources]
        for source, future in zip(sources, staged, strict=True):
            assert torch.equal(stager.take(future), source)
    finally:
        stager.close()
    assert streams.buffers == 2


def test_dtypes_and_shapes_survive_staging():
    stager = Stager(CpuStreams())
    try:
        for tensor in (torch.randn(3, 5).bfloat16(), torch.tensor(7, dtype=torch.int64), torch.empty(0, 4)):
            out = stager.take(stager.stage(_reader(tensor)))
            assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor)
    finally:
        stager.close()


def test_an_error_while_staging_surfaces_from_take():
    @contextmanager
    def broken():
        raise OSError("disk went away")
        yield

    stager = Stager(CpuStreams())
    try:
        future = stager.stage(broken)
        with pytest.raises(OSError, match="disk went away"):
            stager.take(future)
        # the pipeline keeps working after a failed tensor
        assert torch.equal(stager.take(stager.stage(_reader(torch.ones(4)))), torch.ones(4))
    finally:
        stager.close()


def test_interrupt_while_a_copy_is_in_flight_waits_for_it_and_cancels_the_rest():
    streams = _SlowStreams()
    streams.release.clear()
    stager = Stager(streams)
    staged = []
    with pytest.raises(KeyboardInterrupt):
        try:
            staged = [stager.stage(_reader(torch.full((100 * (k + 1),), float(k)))) for k in range(4)]
            assert streams.copying.wait(10)  # the first upload is on the side stream, held there
            raise KeyboardInterrupt
        finally:
            threading.Timer(0.2, streams.release.set).start()
            stager.close()
    # close returned only after the in-flight upload finished reading its buffer
    assert streams.finished and streams.finished[0] == 100
    assert any(f.cancelled() for f in staged[2:])  # what had not started was dropped
    assert not [t for t in threading.enumerate() if t.name.startswith(("loratool-stage", "loratool-side"))]


# --- the merge's staged lane, on CPU-simulated devices ------------------------------

SHAPE = dict(hidden=64, intermediate=160, layers=2, heads=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("streams")
    base = write_llama_checkpoint(root / "base", vocab=96, **SHAPE)
    return base, write_lora_adapter(root / "lora", rank=4, **SHAPE)


@pytest.fixture
def staged_cpu(monkeypatch):
    """Make the merge stage every tensor through `CpuStreams`, as it does through CUDA streams on a GPU."""
    made = []

    def streams_for(device):
        made.append(_SlowStreams(delay=0.001))
        return made[-1]

    monkeypatch.setattr(streams_module, "streams_for", streams_for)
    return made


def _weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def test_staged_merge_gives_the_same_bytes_on_one_or_two_devices(model, tmp_path, staged_cpu, monkeypatch):
    base, adapter = model
    reference = tmp_path / "direct"
    with monkeypatch.context() as patch:
        patch.setattr(streams_module, "streams_for", lambda device: None)
        lora_tools.merge(base, [adapter], reference, device="cpu")
    for spec in ("cpu", "cpu,cpu"):
        out = tmp_path / spec.replace(",", "-")
        report = lora_tools.merge(base, [adapter], out, device=spec)
        assert _weights(out) == _weights(reference)
        assert report.device == spec
    assert len(staged_cpu) == 3 and all(s.finished for s in staged_cpu)


def test_staging_error_fails_the_merge_and_leaves_nothing(model, tmp_path, staged_cpu, monkeypatch):
    base, adapter = model
    from lora_tools.io.checkpoint import Checkpoint

    real = Checkpoint.mapped

    def mapped(self, name):
        if name.endswith("layers.1.mlp.up_proj.weight") and threading.current_thread().name.startswith(
            "loratool-stage"
        ):
            raise OSError(f"read error in {name}")
        return real(self, name)

    monkeypatch.setattr(Checkpoint, "mapped", mapped)
    with pytest.raises(OSError, match="up_proj"):
        lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_staged_merge_leaves_nothing_and_no_threads(model, tmp_path, staged_cpu):
    base, adapter = model
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu,cpu", progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("loratool-")]
