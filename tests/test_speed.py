"""The fast paths give the same bytes: row pools, device lists, worker counts, writeback pacing, early copies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from synthetic import write_llama_checkpoint, write_lora_adapter

import lora_tools
from lora_tools.compute import pool as pool_module
from lora_tools.compute.pool import BlockPool, run_ordered

SHAPE = dict(hidden=64, intermediate=160, layers=2, heads=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A two-shard bf16 Llama (embeddings and head copied, projections changed) and a rank-4 LoRA."""
    root = tmp_path_factory.mktemp("speed")
    base = write_llama_checkpoint(root / "base", vocab=96, max_shard_bytes=60_000, **SHAPE)
    adapter = write_lora_adapter(root / "lora", rank=4, alpha=6.0, **SHAPE)  # scale 1.5: not folded
    return base, adapter


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def _merge(model, output: Path, **options) -> dict[str, bytes]:
    base, adapter = model
    lora_tools.merge(base, [adapter], output, max_shard_size=60_000, **options)
    return _bytes(output)


def test_merge_bytes_do_not_depend_on_workers_blocks_or_devices(model, tmp_path, monkeypatch):
    reference = _merge(model, tmp_path / "reference", device="cpu")
    assert len(reference) >= 2
    # 7-row blocks: tensors span many blocks
    monkeypatch.setattr("lora_tools.merging.arithmetic._BLOCK_BYTES", 7 * 64 * 4)
    for workers in (1, 3):
        monkeypatch.setattr(pool_module, "usable_cores", lambda workers=workers: workers)
        assert _merge(model, tmp_path / f"workers{workers}", device="cpu") == reference
    assert _merge(model, tmp_path / "two-devices", device="cpu,cpu") == reference


def test_merge_matches_an_fp32_reference_rounded_once(model, tmp_path):
    base, adapter = model
    merged = {}
    for data in _merge(model, tmp_path / "out", device="cpu").values():
        merged.update(load_file_bytes(data))
    state = {}
    for file in sorted(base.glob("*.safetensors")):
        state.update(load_file(file))
    factors = load_file(adapter / "adapter_model.safetensors")
    changed = 0
    for name, weight in state.items():
        key = f"base_model.model.{name.removesuffix('.weight')}"
        if f"{key}.lora_A.weight" in factors:
            delta = factors[f"{key}.lora_B.weight"] @ factors[f"{key}.lora_A.weight"] * 1.5
            weight = (weight.float() + delta).to(weight.dtype)
            changed += 1
        assert torch.equal(merged[name], weight), name
    assert changed == 2 * 7


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_writeback_pacing_keeps_the_bytes(model, tmp_path, monkeypatch):
    from lora_tools.io import writeback

    reference = _merge(model, tmp_path / "reference", device="cpu")
    calls = []
    real = writeback._sync_file_range()
    if real is None:
        pytest.skip("no sync_file_range here")

    def counting(fd, offset, nbytes, flags):
        calls.append(flags)
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(writeback, "background_threshold", lambda: 0)
    monkeypatch.setattr(writeback, "_sync_file_range", lambda: counting)
    monkeypatch.setattr(writeback, "WINDOW_BYTES", 20_000)
    monkeypatch.setattr(writeback.Writeback.__init__, "__defaults__", (None, 20_000))
    assert _merge(model, tmp_path / "paced", device="cpu") == reference
    assert writeback._WRITE in calls  # ranges handed to the disk as they finished
    assert writeback._WAIT_BEFORE | writeback._WRITE | writeback._WAIT_AFTER in calls  # and old ones retired


def test_copies_start_before_torch_is_imported(model, tmp_path):
    """Everything up to the kernel copies of untouched tensors runs without torch (its import overlaps them)."""
    base, adapter = model
    script = textwrap.dedent(
        f"""
        import sys, threading
        from lora_tools.commands import merge
        from lora_tools.merging import writer

        def start(self, device):
            assert "torch" not in sys.modules, "torch was imported before the copies started"
            assert [t for t in threading.enumerate() if t.name.startswith("loratool-copy")], "no copy is running"
            assert self.shards and all(job.copies for job in self.shards[:1])
            print("copies started without torch")
            raise KeyboardInterrupt

        writer.MergeWriter.start = start
        try:
            merge.merge({str(base)!r}, [{str(adapter)!r}], {str(tmp_path / "out")!r}, device="cpu")
        except KeyboardInterrupt:
            pass
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "copies started without torch" in done.stdout
    assert list(tmp_path.iterdir()) == []  # the interrupted output was removed


def _fine_tune(tmp_path: Path) -> tuple[Path, Path]:
    base = write_llama_checkpoint(tmp_path / "base", vocab=96, dtype=torch.float32, **SHAPE)
    tuned = write_llama_checkpoint(tmp_path / "tuned", vocab=96, dtype=torch.float32, seed=1, **SHAPE)
    return base, tuned


def test_extract_and_resize_bytes_do_not_depend_on_workers(tmp_path):
    base, tuned = _fine_tune(tmp_path)
    extracted, resized = {}, {}
    for workers in (1, 2, 3):
        out = tmp_path / f"extract{workers}"
        lora_tools.extract(base, tuned, out, rank=6, device="cpu", workers=workers)
        extracted[workers] = (out / "adapter_model.safetensors").read_bytes()
        small = tmp_path / f"resize{workers}"
        lora_tools.resize(tmp_path / "extract1", small, rank=3, device="cpu", workers=workers)
        resized[workers] = (small / "adapter_model.safetensors").read_bytes()
    assert extracted[1] == extracted[2] == extracted[3]
    assert resized[1] == resized[2] == resized[3]
    assert lora_tools.extract(base, tuned, tmp_path / "devices", rank=6, device="cpu,cpu", workers=2).modules
    assert (tmp_path / "devices" / "adapter_model.safetensors").read_bytes() == extracted[1]


def test_workers_option_is_checked(tmp_path):
    base, tuned = _fine_tune(tmp_path)
    result = run_cli(["extract", base, tuned, "-o", tmp_path / "out", "--rank", "2", "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.stderr
    assert not (tmp_path / "out").exists()


def test_mixed_device_list_is_refused(model, tmp_path):
    base, adapter = model
    result = run_cli(["merge", base, adapter, "-o", tmp_path / "out", "-q", "--device", "cpu,cuda:0"])
    assert result.exit_code in (3, 4)
    assert "--device" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_run_ordered_keeps_order_and_bounds_work_in_flight():
    running, peak, lock = [0], [0], threading.Lock()

    def work(item: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (7 - item % 7))  # later items often finish first
        with lock:
            running[0] -= 1
        return item * item

    assert list(run_ordered(range(20), work, workers=3)) == [i * i for i in range(20)]
    assert peak[0] <= 3
    assert list(run_ordered(range(5), work, workers=1)) == [i * i for i in range(5)]


def test_run_ordered_raises_the_first_error_and_stops():
    started = []

    def work(item: int) -> int:
        started.append(item)
        if item == 2:
            raise ValueError("module 2 is broken")
        time.sleep(0.01)
        return item

    with pytest.raises(ValueError, match="module 2"):
        list(run_ordered(range(50), work, workers=2))
    assert len(started) < 10  # nothing was queued far ahead


def test_block_pool_each_deals_one_at_a_time_and_stops_on_an_error():
    """`each`: every index once, results in index order, a slow worker doing fewer; after a failure no worker
    starts another index, and the error surfaces once they have all stopped."""
    seen: list[tuple[int, int]] = []

    def work(worker: int, index: int) -> int:
        time.sleep(0.03 if worker == 0 else 0.001)  # worker 0 is held up
        seen.append((worker, index))
        return index * index

    with BlockPool(2) as pool:
        assert pool.each(40, work) == [i * i for i in range(40)]
        assert sorted(i for _, i in seen) == list(range(40))
        assert sum(w == 0 for w, _ in seen) < 10  # the other worker took the rest as they came
        assert pool.each(0, work) == [] and pool.each(1, lambda worker, index: (worker, index)) == [(0, 0)]
        started, finished = [], []

        def failing(worker: int, index: int) -> int:
            started.append(index)
            if index == 3:
                raise RuntimeError("index 3 failed")
            time.sleep(0.05)
            finished.append(index)
            return index

        with pytest.raises(RuntimeError, match="index 3"):
            pool.each(100, failing)
        assert len(started) < 10  # nothing new started once the failure was seen
        assert sorted(finished) == sorted(i for i in started if i != 3)  # and the rest had stopped before it rose


def test_a_batch_started_after_a_failing_one_starts_no_block():
    """`start(..., after=first)`: a tensor's blocks queued behind a tensor that failed never run."""
    ran: list[int] = []
    queued = threading.Event()

    def failing(worker: int, index: int) -> None:
        queued.wait(5)  # the second batch is queued before any block of the first fails
        raise ValueError(f"block {index}")

    with BlockPool(2) as pool:
        first = pool.start(4, failing)
        second = pool.start(4, lambda worker, index: ran.append(index), after=first)
        queued.set()
        with pytest.raises(ValueError, match="block"):
            first.help()
        with pytest.raises(ValueError, match="block"):
            first.wait()
        second.help()
        assert second.wait() == [None] * 4 and ran == []
        assert pool.start(3, lambda worker, index: index).wait() == [0, 1, 2]  # the helpers still work


def test_merge_opens_the_next_tensor_before_finishing_the_last(model, tmp_path, monkeypatch):
    """On the CPU, tensor k+1 is opened (its blocks started) before tensor k is finished, with at most two
    open: the calling thread's per-tensor work overlaps the helpers' blocks. The bytes stay the same."""
    from lora_tools.merging import writer as merging

    reference = _merge(model, tmp_path / "reference", device="cpu")
    calls: list[tuple[str, str]] = []
    original_open, original_finish = merging.MergeWriter._open, merging._Open.finish

    def opening(self, lane, job, task, upcoming, before):
        calls.append(("open", task.name))
        return original_open(self, lane, job, task, upcoming, before)

    def finishing(self):
        calls.append(("finish", self.task.name))
        return original_finish(self)

    monkeypatch.setattr(merging.MergeWriter, "_open", opening)
    monkeypatch.setattr(merging._Open, "finish", finishing)
    monkeypatch.setattr("lora_tools.merging.arithmetic._BLOCK_BYTES", 7 * 64 * 4)
    monkeypatch.setattr(pool_module, "usable_cores", lambda: 2)
    assert _merge(model, tmp_path / "out", device="cpu") == reference
    names = [name for kind, name in calls if kind == "open"]
    assert len(names) == 14 and [name for kind, name in calls if kind == "finish"] == names
    expected = [("open", names[0])]
    for before, after in zip(names[:-1], names[1:], strict=True):
        expected += [("open", after), ("finish", before)]
    assert calls == [*expected, ("finish", names[-1])]


def test_a_failed_block_stops_the_tensors_in_flight_and_leaves_nothing(model, tmp_path, monkeypatch):
    """A write failing in the middle of the merge (a tensor open behind it, helpers busy): the error is
    raised once no block runs any more, nothing is written after it, and no output is left."""
    import errno
    import os

    from lora_tools.io import storage

    calls, after_failure = [0], []
    real = storage.os.pwrite

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == 25:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if calls[0] > 25:
            after_failure.append(offset)
        return real(fd, data, offset)

    monkeypatch.setattr(storage.os, "pwrite", pwrite)  # every pwrite of the merge goes through storage.pwrite_all
    monkeypatch.setattr("lora_tools.merging.arithmetic._BLOCK_BYTES", 7 * 64 * 4)
    monkeypatch.setattr(pool_module, "usable_cores", lambda: 2)
    base, adapter = model
    with pytest.raises(OSError) as caught:
        lora_tools.merge(base, [adapter], tmp_path / "out", device="cpu", max_shard_size=60_000)
    assert caught.value.errno == errno.EIO and caught.value.filename
    assert len(after_failure) <= 2  # at most the blocks already running on the other worker
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_yielding_to_the_compute_lowers_only_the_calling_thread():
    import os

    seen = {}

    def lowered() -> None:
        pool_module.yield_to_compute()
        seen["helper"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    helper = threading.Thread(target=lowered)
    helper.start()
    helper.join()
    assert seen["helper"] == 19 and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


def test_no_two_threads_compute_as_the_same_worker_when_batches_queue_up():
    """With batches queued behind each other, a helper free early takes up the next batch while another
    still runs the last: each must compute as itself (its own buffers), never as the busy one."""
    active, overlaps, lock = set(), [], threading.Lock()
    release = threading.Event()

    def work(worker: int, index: int) -> None:
        with lock:
            if worker in active:
                overlaps.append(worker)
            active.add(worker)
        if index == 0:
            release.wait(5)  # the first block holds its worker until the next batch is under way
        else:
            time.sleep(0.002)
        with lock:
            active.discard(worker)

    with BlockPool(3) as pool:
        first = pool.start(3, work)
        second = pool.start(12, work, after=first)
        time.sleep(0.05)  # the helper not held up is done with the first batch and into the second
        release.set()
        first.help()
        first.wait()
        second.help()
        second.wait()
    assert overlaps == []
