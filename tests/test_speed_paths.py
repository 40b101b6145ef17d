"""The merge's pwrite row sink, the phase trace, the overflow check and the workers' queue: results and failures."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import traced_merge
from safetensors.torch import load_file
from synthetic import write_llama_checkpoint, write_lora_adapter

import lora_tools
from lora_tools import trace
from lora_tools.compute.pool import run_ordered
from lora_tools.errors import NonFiniteError
from lora_tools.io import storage
from lora_tools.io.rows import RowSink
from lora_tools.io.tensors import tensor_bytes
from lora_tools.merging import arithmetic
from lora_tools.merging.arithmetic import _rounds_finite, overflow_limit

SHAPE = dict(hidden=64, intermediate=160, layers=2, heads=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("paths")
    base = write_llama_checkpoint(root / "base", vocab=96, **SHAPE)
    adapter = write_lora_adapter(root / "lora", rank=4, alpha=8.0, **SHAPE)
    return base, adapter


def _left_behind(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the row sink ------------------------------------------------------------------


def test_row_sink_writes_rows_in_place_and_refuses_what_does_not_fit(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(b"\xff" * 200)
    values = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4).to(torch.bfloat16)  # a conv-like 3-D tensor
    with open(path, "r+b") as f:
        sink = RowSink(f.fileno(), path, 8, torch.bfloat16, (3, 2, 4))
        sink.write(2, values[2].reshape(1, -1).contiguous())  # rows in any order, flattened or not
        sink.write(0, values[:2])
        for rows, first in ((values[:1].float(), 0), (values[:, :1].contiguous(), 0), (values[:2].transpose(1, 2), 0)):
            with pytest.raises(AssertionError, match="do not fit"):
                sink.write(first, rows)
        with pytest.raises(AssertionError, match="outside"):
            sink.write(2, values[:2])
        with sink.written() as result:
            assert torch.equal(result, values)
    data = path.read_bytes()
    assert data[:8] == b"\xff" * 8 and data[8 + 48 :] == b"\xff" * (200 - 56)  # nothing outside its place


def test_row_sink_takes_whole_rows_of_bytes_and_names_its_file_in_an_error(tmp_path):
    path = tmp_path / "t.bin"
    path.write_bytes(bytes(16))
    values = torch.arange(8, dtype=torch.float32).reshape(2, 4).to(torch.bfloat16)
    with open(path, "rb") as f:  # opened for reading: pwrite fails
        sink = RowSink(f.fileno(), path, 0, torch.bfloat16, (2, 4))
        with pytest.raises(AssertionError, match="not whole rows"):
            sink.write_bytes(0, tensor_bytes(values)[:5])
        with pytest.raises(AssertionError, match="outside"):
            sink.write_bytes(1, tensor_bytes(values))
        with pytest.raises(OSError) as caught:
            sink.write_bytes(0, tensor_bytes(values))
    assert caught.value.errno == errno.EBADF and caught.value.filename == str(path)
    assert path.read_bytes() == bytes(16)


def test_pwrite_all_finishes_short_writes_and_names_its_file(tmp_path, monkeypatch):
    path = tmp_path / "t.bin"
    path.write_bytes(bytes(12))
    real = os.pwrite
    monkeypatch.setattr(storage.os, "pwrite", lambda fd, data, offset: real(fd, bytes(data[:3]), offset))  # 3 at a time
    with open(path, "r+b") as f:
        storage.pwrite_all(f.fileno(), b"abcdefgh", 2, path)
    assert path.read_bytes() == b"\0\0abcdefgh\0\0"
    with open(path, "rb") as f, pytest.raises(OSError) as caught:
        monkeypatch.setattr(storage.os, "pwrite", real)
        storage.pwrite_all(f.fileno(), b"x", 0, path)
    assert caught.value.errno == errno.EBADF and caught.value.filename == str(path)


def test_a_failed_row_write_names_the_output_and_leaves_nothing(model, tmp_path, monkeypatch):
    base, adapter = model

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename
    assert _left_behind(tmp_path) == []


@pytest.mark.parametrize("block_rows", [None, 4])
def test_an_overflowing_result_is_refused_with_its_count(model, tmp_path, monkeypatch, block_rows):
    """The count in the message is read back from the rows the sink wrote; the output is removed.

    With 4-row blocks, each tensor is many blocks dealt to the workers: the overflow is found
    from the extremes every block recorded.
    """
    base, adapter = model
    if block_rows is not None:
        monkeypatch.setattr(arithmetic, "_BLOCK_BYTES", block_rows * SHAPE["hidden"] * 4)
    weight = 3e7  # max |w·ΔW| ≈ 10⁵: some sums pass fp16's 65504, most do not
    with pytest.raises(NonFiniteError, match=r"the result has \d+ NaN/Inf value\(s\) in F16") as caught:
        lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu", weights=[weight], dtype="fp16")
    assert _left_behind(tmp_path) == []
    message = str(caught.value)
    name = message.split("'")[1]
    state = load_file(base / "model.safetensors")
    factors = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{name.removesuffix('.weight')}"
    expected = state[name].float()  # the merge's own steps: the power-of-two scale folded into A, then one add
    expected.add_(
        factors[f"{key}.lora_B.weight"].float() @ (factors[f"{key}.lora_A.weight"].float() * 2.0), alpha=weight
    )
    bad = int((~torch.isfinite(expected.to(torch.float16))).sum())
    assert 0 < bad < expected.numel() and f"has {bad} NaN/Inf" in message


@pytest.mark.parametrize("block_rows", [None, 4])
def test_each_change_reports_its_largest_weighted_delta(model, tmp_path, monkeypatch, block_rows):
    """max |wᵢ·ΔWᵢ| per tensor, gathered from every block's extremes, against whole products in fp64."""
    base, adapter = model
    if block_rows is not None:
        monkeypatch.setattr(arithmetic, "_BLOCK_BYTES", block_rows * SHAPE["hidden"] * 4)
    report = lora_tools.merge(base, [adapter, adapter], tmp_path / "out", device="cpu", weights=[0.5, -1.5])
    factors = load_file(adapter / "adapter_model.safetensors")
    assert len(report.changes) == 14
    for change in report.changes:
        key = f"base_model.model.{change.tensor.removesuffix('.weight')}"
        delta = factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double() * 2.0
        assert change.max_abs_delta == pytest.approx(1.5 * float(delta.abs().max()), rel=1e-6), change.tensor
    assert report.max_abs_delta == max(change.max_abs_delta for change in report.changes)


# --- the overflow check ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("source", [torch.float32, torch.float64])
def test_overflow_check_agrees_with_rounding_at_the_limit(dtype, source):
    limit = torch.tensor(overflow_limit(dtype), dtype=source)
    zero = torch.tensor(0.0, dtype=source)
    below = torch.nextafter(limit, zero)
    for value in (limit, below, torch.nextafter(below, zero), torch.tensor(float("inf"), dtype=source)):
        for sign in (1, -1):
            values = torch.stack([value * sign, torch.tensor(1.0, dtype=source)])
            assert _rounds_finite(values, dtype) == bool(torch.isfinite(values.to(dtype)).all()), (value, sign)
    assert not _rounds_finite(torch.tensor([1.0, float("nan")], dtype=source), dtype)


# --- the phase trace -----------------------------------------------------------------


def test_trace_shows_the_copies_overlapping_the_torch_import(model, tmp_path):
    base, adapter = model
    events = traced_merge(base, adapter, tmp_path / "out", tmp_path / "trace.jsonl")
    spans = trace.summary(events)
    assert {"copy", "import torch", "compute", "row blocks"} <= set(spans)
    assert spans["compute"]["count"] == 2 * 7  # every changed projection
    assert spans["copy"]["first"] < spans["import torch"]["first"] + spans["import torch"]["seconds"]
    assert spans["import torch"]["thread_cpu"] > 0
    marks = [e["name"] for e in events if e["kind"] == "mark"]
    assert marks.index("planned") < marks.index("renamed into place") < marks.index("exit")
    assert all(e["t"] >= 0 for e in events)


def test_trace_is_silent_and_free_when_off(monkeypatch):
    assert not trace.enabled()
    before = len(trace.events())
    with trace.span("nothing"):
        trace.mark("nothing")
    assert len(trace.events()) == before


# --- the workers' queue ----------------------------------------------------------------


def test_a_worker_does_not_idle_behind_a_long_task():
    """With tasks queued ahead, task 3 starts while task 0 still runs (with one slot per worker it could not)."""
    third_started = threading.Event()

    def work(item: int) -> int:
        if item == 0:
            assert third_started.wait(10), "task 3 never started while task 0 ran"
        if item == 3:
            third_started.set()
        return item

    assert list(run_ordered(range(8), work, workers=2, ahead=4)) == list(range(8))


def test_a_failing_module_stops_extraction_and_leaves_nothing(tmp_path, monkeypatch):
    base = write_llama_checkpoint(tmp_path / "base", vocab=96, dtype=torch.float32, **SHAPE)
    tuned = write_llama_checkpoint(tmp_path / "tuned", vocab=96, dtype=torch.float32, seed=1, **SHAPE)
    from lora_tools.extraction import modules as extraction

    calls = []
    real = extraction.factorize

    def failing(matrix, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("module three failed")
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(extraction, "factorize", failing)
    with pytest.raises(RuntimeError, match="module three"):
        lora_tools.extract(base, tuned, tmp_path / "out", rank=4, device="cpu", workers=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert not [t for t in threading.enumerate() if t.name.startswith("loratool-")]


def test_adapter_digest_is_remembered_only_while_the_file_is_unchanged(tmp_path):
    from lora_tools.merging.record import sha256_file as _sha256

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"first")
    first = _sha256(path)
    assert first == _sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"other")  # same size
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert _sha256(path) == hashlib.sha256(b"other").hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_extremes_equal_aminmax_nan_and_inf_included(dtype):
    """`compute.extremes` (amin then amax for fp32/fp64, aminmax otherwise) gives aminmax's values exactly."""
    from lora_tools.compute.extremes import extremes

    values = (torch.randn(37, 101, dtype=torch.float64) * 3).to(dtype)
    for poke in (None, float("inf"), float("-inf"), float("nan")):
        if poke is not None:
            values[5, 7] = poke
        expected = [float(v) for v in torch.aminmax(values)]
        got = [float(v) for v in extremes(values)]
        assert got == expected or (poke != poke and all(v != v for v in got)), (poke, got, expected)
