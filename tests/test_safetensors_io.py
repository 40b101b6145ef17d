"""The safetensors reader refuses every malformed header, naming the file and entry."""

from __future__ import annotations

import struct

import pytest
import torch
from hostile import write_raw_safetensors
from safetensors.torch import save_file

from lora_tools.errors import CorruptFileError
from lora_tools.io.safetensors_header import read_header
from lora_tools.io.safetensors_writer import SafetensorsWriter
from lora_tools.io.tensors import read_safetensors_tensor, tensor_bytes


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


CASES = {
    "not json": (None, b"{not json", b"", "not valid JSON"),
    "json list": ([1, 2], None, b"", "expected an object"),
    "unknown dtype": ({"t": entry(dtype="F7")}, None, bytes(8), "unknown dtype 'F7'"),
    "bad shape": ({"t": entry(shape=(-1,))}, None, bytes(8), "invalid shape"),
    "dtype x shape vs bytes": ({"t": entry(shape=(3,))}, None, bytes(8), "needs 12 bytes but its offsets span 8"),
    "overlap": ({"a": entry(), "b": entry(begin=4, end=12)}, None, bytes(12), "overlaps"),
    "gap": ({"a": entry(), "b": entry(begin=12, end=20)}, None, bytes(20), "gap of 4 bytes"),
    "past end": ({"a": entry()}, None, bytes(4), "truncated"),
    "trailing bytes": ({"a": entry()}, None, bytes(12), "unexpected bytes after"),
    "metadata not strings": ({"__metadata__": {"a": 1}, "t": entry()}, None, bytes(8), "__metadata__"),
    "bad offsets": (
        {"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
        None,
        bytes(8),
        "invalid data_offsets",
    ),
    "entry not object": ({"t": 5}, None, b"", "is not an object"),
    "duplicate names": (
        None,
        b'{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        bytes(8),
        "twice",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_headers_are_refused(case, tmp_path):
    header, raw, data, message = CASES[case]
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, data, raw)
    with pytest.raises(CorruptFileError, match=message) as info:
        read_header(path)
    assert str(path) in str(info.value)


def test_header_length_beyond_file_and_limit(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CorruptFileError, match="runs past the end"):
        read_header(path)
    path.write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    with pytest.raises(CorruptFileError, match="100 MB"):
        read_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CorruptFileError, match="too short"):
        read_header(path)


def test_reader_agrees_with_safetensors_library(tmp_path):
    tensors = {
        "b": torch.randn(3, 4).to(torch.bfloat16),
        "a": torch.arange(5, dtype=torch.int64),
        "e": torch.zeros(0, 3),
        "h": torch.randn(2, 2).half(),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"k": "v"})
    infos, metadata = read_header(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"}
    for name, tensor in tensors.items():
        assert torch.equal(read_safetensors_tensor(infos[name]), tensor)


def test_writer_output_loads_in_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"z": torch.randn(3, 5), "a": torch.randn(7).to(torch.bfloat16), "m": torch.ones(2, dtype=torch.int32)}
    save_file({"src": tensors["z"]}, tmp_path / "src.safetensors")
    source, _ = read_header(tmp_path / "src.safetensors")
    writer = SafetensorsWriter(
        tmp_path / "out.safetensors", [("z", "F32", (3, 5)), ("a", "BF16", (7,)), ("m", "I32", (2,))], {"format": "pt"}
    )
    writer.copy_from("z", source["src"])
    writer.write("a", tensor_bytes(tensors["a"]))
    writer.write("m", tensor_bytes(tensors["m"]))
    writer.close()
    loaded = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    read_header(tmp_path / "out.safetensors")  # and our own strict reader accepts it


def test_checked_copy_reads_each_chunk_once_and_counts_the_whole_tensor(tmp_path, monkeypatch):
    """Copies check each chunk right after copying it (its bytes still cached); chunks copied before torch is
    `ready` are checked first once it is, or by `finish`; the message counts NaN/Inf over the whole tensor."""
    from lora_tools.errors import NonFiniteError
    from lora_tools.io import safetensors_writer
    from lora_tools.merging.checks import CopyChecks

    monkeypatch.setattr(safetensors_writer, "COPY_CHUNK_BYTES", 1024)  # 256 float32 values a chunk
    early, late = torch.randn(1000), torch.randn(1000)
    early[10], late[999], late[300] = float("nan"), float("inf"), float("nan")  # early's first, late's 2nd and 4th
    save_file({"early": early, "late": late, "ints": torch.arange(9)}, tmp_path / "src.safetensors")
    source, _ = read_header(tmp_path / "src.safetensors")
    specs = [("early", "F32", (1000,)), ("late", "F32", (1000,)), ("ints", "I64", (9,))]
    writer = SafetensorsWriter(tmp_path / "out.safetensors", specs, None)
    seen = []
    checks = CopyChecks(wanted=True)
    assert checks.after_chunk(source["ints"]) is None  # integers hold no NaN
    checks_early = checks.after_chunk(source["early"])
    writer.copy_from("early", source["early"], lambda start, n: (seen.append(start), checks_early(start, n)))
    assert seen == [0, 1024, 2048, 3072] and len(checks.pending) == 4  # torch not ready: all four wait
    checks.ready.set()
    with pytest.raises(NonFiniteError, match=r"'early' holds 1 NaN/Inf"):  # late's first chunk drains the waiting
        writer.copy_from("late", source["late"], checks.after_chunk(source["late"]))
    writer.copy_from("ints", source["ints"], checks.after_chunk(source["ints"]))
    checks.pending[:] = []
    late_only = CopyChecks(wanted=True)
    late_only.ready.set()
    with pytest.raises(NonFiniteError, match=r"'late' holds 2 NaN/Inf"):
        late_only.after_chunk(source["late"])(3072, 1000 * 4 - 3072)  # the last chunk: both counted
    unwanted = CopyChecks(wanted=False)
    assert unwanted.after_chunk(source["late"]) is None
    deferred = CopyChecks(wanted=True)
    deferred.after_chunk(source["early"])(0, 1024)
    deferred.ready.set()
    with pytest.raises(NonFiniteError, match=r"'early' holds 1 NaN/Inf"):
        deferred.finish()
    whole = SafetensorsWriter(tmp_path / "chunked.safetensors", specs[:1], None)
    whole.copy_from("early", source["early"], lambda start, n: None)  # in four chunks, every byte in its place
    whole.close()
    copied = read_safetensors_tensor(read_header(tmp_path / "chunked.safetensors")[0]["early"])
    assert torch.equal(copied.view(torch.int32), early.view(torch.int32))  # bit for bit, the NaN included
    save_file({"none": torch.empty(0)}, tmp_path / "empty.safetensors")  # e.g. ComfyUI's scaled_fp8 marker
    empty_source = read_header(tmp_path / "empty.safetensors")[0]["none"]
    for callback in (None, checks.after_chunk(empty_source)):
        empty = SafetensorsWriter(tmp_path / "empty-out.safetensors", [("none", "F32", (0,))], None)
        empty.copy_from("none", empty_source, callback)
        empty.close()


def test_checked_copies_wait_for_torch_past_a_backlog_and_are_released_by_abandon(tmp_path, monkeypatch):
    """Past `backlog` bytes copied before torch is ready, the copier waits (a cold import of torch can outlast
    every copy, whose checks would then read the bytes from the disk again); `abandon` releases it, checking nothing."""
    import threading

    from lora_tools.errors import NonFiniteError
    from lora_tools.io import safetensors_writer
    from lora_tools.merging.checks import CopyChecks

    monkeypatch.setattr(safetensors_writer, "COPY_CHUNK_BYTES", 1024)
    values = torch.randn(1000)
    values[900] = float("nan")  # in the last chunk
    save_file({"t": values}, tmp_path / "src.safetensors")
    source = read_header(tmp_path / "src.safetensors")[0]["t"]
    for release, error in (("ready", NonFiniteError), ("abandon", None)):
        checks = CopyChecks(wanted=True, backlog=2048)
        writer = SafetensorsWriter(tmp_path / f"{release}.safetensors", [("t", "F32", (1000,))], None)
        seen, failed = [], []
        callback = checks.after_chunk(source)

        def copy(writer=writer, seen=seen, failed=failed, callback=callback):
            try:
                writer.copy_from("t", source, lambda start, n: (seen.append(start), callback(start, n)))
            except NonFiniteError as exc:
                failed.append(exc)

        copier = threading.Thread(target=copy)
        copier.start()
        copier.join(0.5)
        assert copier.is_alive() and seen == [0, 1024], seen  # two chunks copied, then it waits for torch
        checks.ready.set() if release == "ready" else checks.abandon()
        copier.join(10)
        assert not copier.is_alive() and seen == [0, 1024, 2048, 3072]
        assert [type(e) for e in failed] == ([error] if error else []), failed
