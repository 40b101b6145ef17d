"""Outputs under faults: a disk that fills during the run, file-size limits, folders that cannot be written.

Each case checks the exit code (4: the machine, not the input), the one-line
message naming the output, and that nothing was left on disk (with --force,
the old output is untouched).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from fault_models import mounted_tmpfs, remount_read_only, write_big_llama
from safetensors.torch import load_file
from synthetic import write_lora_adapter

import lora_tools
from lora_tools import errors
from lora_tools.io import storage, tensors
from lora_tools.io.safetensors_writer import SafetensorsWriter

FIXTURE_BASE = REPO / "fixtures" / "tiny-llama"
FIXTURE_ADAPTER = REPO / "fixtures" / "tiny-llama-lora"
COMMANDS = ["merge", "unmerge", "extract", "resize", "convert"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A checkpoint shaped like the fixture base but different: the fixture adapter merged in."""
    path = tmp_path_factory.mktemp("tuned") / "merged"
    lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], path, device="cpu")
    return path


def command_args(command: str, out: Path, tuned: Path) -> list:
    """The command line of each writing command, writing to `out`."""
    return {
        "merge": ["merge", FIXTURE_BASE, FIXTURE_ADAPTER],
        "unmerge": ["unmerge", tuned, FIXTURE_ADAPTER],
        "extract": ["extract", FIXTURE_BASE, tuned, "--rank", "4"],
        "resize": ["resize", FIXTURE_ADAPTER, "--rank", "2"],
        "convert": ["convert", FIXTURE_ADAPTER, "--to", "kohya", "--component", "unet"],
    }[command] + ["-o", out, "-q", "--force"]


def old_output(folder: Path, command: str) -> Path:
    """An earlier output that --force may replace only with a complete new one."""
    if command == "convert":
        out = folder / "out.safetensors"
        out.write_bytes(b"old output")
    else:
        out = folder / "out"
        out.mkdir()
        (out / "old.txt").write_text("old output")
    return out


def assert_untouched(folder: Path, out: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [out.name]  # no temporary, no scratch file
    kept = out.read_bytes() if out.is_file() else (out / "old.txt").read_bytes()
    assert kept == b"old output"
    if out.is_dir():
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def assert_one_error_line(stderr: str, *phrases: str, output: Path | None = None) -> None:
    """One `error:` line holding every phrase and, given `output`, naming it (or a file in it) first."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr and "internal error" not in stderr, stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    if output is not None:
        assert re.match(rf"error: {re.escape(str(output))}[:/]", lines[0]), (output, lines[0])


# --- the error table ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "kind", "phrase"),
    [
        (errno.ENOSPC, errors.DiskSpaceError, "the disk filled up"),
        (errno.EDQUOT, errors.DiskSpaceError, "disk quota exceeded"),
        (errno.EFBIG, errors.FileTooLargeError, "the file is larger than this system allows: ulimit -f"),
        (errno.EROFS, errors.NotWritableError, "read-only"),
        (errno.EACCES, errors.NotWritableError, "permission denied"),
        (errno.EPERM, errors.NotWritableError, "not permitted"),
        (errno.ENAMETOOLONG, errors.PathTooLongError, "too long"),
        (errno.EMFILE, errors.TooManyOpenFilesError, "ulimit -n"),
        (errno.ENFILE, errors.TooManyOpenFilesError, "too many open files"),
    ],
)
def test_environment_errnos_become_exit_4_naming_the_path(code, kind, phrase):
    problem = errors.os_error_problem(OSError(code, os.strerror(code), "/data/out/model.safetensors"))
    assert isinstance(problem, kind) and problem.exit_code == errors.EXIT_ENVIRONMENT
    assert str(problem).startswith("/data/out/model.safetensors: ") and phrase in str(problem)


def test_error_table_edges():
    copy = OSError(errno.ENOSPC, "No space left on device", "/in/config.json", None, "/out/config.json")
    assert str(errors.os_error_problem(copy)).startswith("/out/config.json: ")  # the file being written
    unnamed = errors.os_error_problem(OSError(errno.ENOSPC, "x"), where="the cache /c")
    assert str(unnamed).startswith("the cache /c: the disk filled up")
    for code in (errno.ENOTDIR, errno.EEXIST):  # a file in the way: the user's path, not the machine
        assert errors.os_error_problem(OSError(code, "x", "/a/file/out")).exit_code == errors.EXIT_INVALID
    assert errors.os_error_problem(OSError(errno.EBADF, "Bad file descriptor")) is None  # our bug, not the disk
    assert errors.os_error_problem(ValueError("x")) is None
    assert errors.os_error_problem(errors.DiskSpaceError("already ours")) is None


# --- reservation ---------------------------------------------------------------

SPECS = [("a", "F32", (1024, 1024)), ("b", "BF16", (3, 5)), ("c", "F16", (2048, 512))]


def _write_allocated_file(path: Path) -> SafetensorsWriter:
    """Check the blocks right after creation, then write every tensor through `mapped` and read it back."""
    writer = SafetensorsWriter(path, SPECS, {"format": "pt"})
    stat = os.stat(path)
    assert stat.st_size == writer.total_bytes > 6_000_000
    assert stat.st_blocks * 512 >= writer.total_bytes  # allocated, not sparse
    for position, (name, _, _) in enumerate(SPECS):
        with writer.mapped(name) as place:
            place.fill_(position + 0.5)
    writer.close()
    state = load_file(path)
    assert [state[name].unique().tolist() for name, _, _ in SPECS] == [[0.5], [1.5], [2.5]]
    return writer


def test_output_blocks_are_allocated_when_the_file_is_created(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="lora_tools")
    writer = _write_allocated_file(tmp_path / "x.safetensors")
    assert writer.reserved and "reserved" in caplog.text


def _no_fallocate(fd, size):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def test_without_fallocate_zeros_are_written_and_tensors_go_through_pwrite(tmp_path, monkeypatch, caplog):
    """Where space cannot be reserved, nothing is written through a mapping (which a full disk answers with SIGBUS)."""
    reference = lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], tmp_path / "mapped", device="cpu", checksum=True)
    monkeypatch.setattr(storage, "_allocate", _no_fallocate)
    caplog.set_level(logging.DEBUG, logger="lora_tools")
    writable_maps = []
    real = tensors.mapped_tensor
    monkeypatch.setattr(
        tensors, "mapped_tensor",
        lambda *a, writable=False, **k: writable_maps.append(writable) or real(*a, writable=writable, **k),
    )  # fmt: skip
    writer = _write_allocated_file(tmp_path / "x.safetensors")
    assert not writer.reserved and "cannot reserve space; writing" in caplog.text
    report = lora_tools.merge(FIXTURE_BASE, [FIXTURE_ADAPTER], tmp_path / "written", device="cpu", checksum=True)
    assert report.checksums == reference.checksums  # the same bytes either way
    assert report.tensors_changed > 0 and True not in writable_maps


@pytest.mark.parametrize("command", COMMANDS)
def test_no_space_at_reservation_is_exit_4_and_keeps_the_old_output(command, tuned, tmp_path, monkeypatch):
    def full(fd, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage, "_allocate", full)
    out = old_output(tmp_path, command)
    result = run_cli(command_args(command, out, tuned))
    assert result.exit_code == 4, result.stderr
    assert_one_error_line(result.stderr, "the disk filled up", "free some space", output=out)
    assert_untouched(tmp_path, out)


# --- file-size limits --------------------------------------------------------

FILE_SIZE_LIMIT = 8192  # below every weights file these commands write, above their JSON files


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


# One child process runs every command (through Click's runner, as `run_cli` does): importing torch
# once per command would cost more than this whole file's budget on two cores.
_RUN_EACH = """
import json, sys
from click.testing import CliRunner
from lora_tools.cli import cli
results = {}
for command, args in json.loads(sys.argv[1]).items():
    outcome = CliRunner().invoke(cli, args)
    results[command] = [outcome.exit_code, outcome.stderr]
print(json.dumps(results))
"""


def test_file_size_limit_is_exit_4_for_every_writing_command(tuned, tmp_path):
    """`ulimit -f` on a child process: SIGXFSZ is ignored, the write fails with EFBIG, exit 4."""
    outputs, commands = {}, {}
    for command in COMMANDS:
        folder = tmp_path / command
        folder.mkdir()
        outputs[command] = old_output(folder, command)
        commands[command] = [str(a) for a in command_args(command, outputs[command], tuned)]
    done = subprocess.run(
        [sys.executable, "-c", _RUN_EACH, json.dumps(commands)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for command, (code, stderr) in json.loads(done.stdout).items():
        out = outputs[command]
        assert code == 4, (command, stderr)
        assert_one_error_line(stderr, "larger than this system allows: ulimit -f", output=out)
        assert_untouched(out.parent, out)


# --- folders that cannot be written ------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "1m") as folder:
        yield folder


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_filesystem_is_exit_4_and_keeps_the_old_output(command, tuned, read_only_folder):
    out = old_output(read_only_folder, command)
    remount_read_only(read_only_folder)
    result = run_cli(command_args(command, out, tuned))
    assert result.exit_code == 4, result.stderr
    assert_one_error_line(result.stderr, "read-only", output=out)
    assert_untouched(read_only_folder, out)


def test_output_under_a_folder_that_cannot_be_created(tuned, read_only_folder):
    remount_read_only(read_only_folder)
    result = run_cli(command_args("resize", read_only_folder / "new" / "out", tuned))
    assert result.exit_code == 4, result.stderr
    assert_one_error_line(result.stderr, f"error: {read_only_folder / 'new'}: the filesystem is read-only")
    assert list(read_only_folder.iterdir()) == []


@pytest.fixture
def locked_folder(tmp_path):
    """A folder nobody may add files to: mode 0555, or (as root, who ignores modes) the immutable attribute."""
    folder = tmp_path / "locked"
    folder.mkdir()
    yield folder, (lambda: _lock(folder))
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def _lock(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    try:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("running as root (modes do not bind) and there is no chattr")
    if done.returncode != 0:
        pytest.skip(f"running as root (modes do not bind) and this filesystem has no immutable flag: {done.stderr}")


@pytest.mark.parametrize("command", ["merge", "convert"])  # a folder output, and a one-file output
def test_folder_without_write_permission_is_exit_4_and_keeps_the_old_output(command, tuned, locked_folder):
    folder, lock = locked_folder
    out = old_output(folder, command)
    lock()
    result = run_cli(command_args(command, out, tuned))
    assert result.exit_code == 4, result.stderr
    assert_one_error_line(result.stderr, "permission" if os.geteuid() else "not permitted", output=out)
    assert_untouched(folder, out)


def test_output_path_through_a_file_is_a_path_mistake(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_cli(["resize", FIXTURE_ADAPTER, "--rank", "2", "-o", tmp_path / "file" / "out", "-q"])
    assert result.exit_code == 3, result.stderr
    assert_one_error_line(result.stderr, f"error: {tmp_path / 'file'}: ", "a file where a folder is needed")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


# --- a disk that fills during the run -----------------------------------------


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    """About 230 MB of bf16 weights, and a rank-8 adapter on every projection."""
    folder = tmp_path_factory.mktemp("large")
    shape = dict(hidden=1024, intermediate=2816, heads=16)
    base = write_big_llama(folder / "base", layers=8, vocab=8192, **shape)
    adapter = write_lora_adapter(folder / "lora", layers=8, rank=8, **shape)
    return base, adapter


def _wait_for_first_shard(out: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(out.parent.glob(f".{out.name}.loratool-tmp-*/*.safetensors")):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.002)
    raise AssertionError("the merge never started writing")


def _fill(path: Path) -> None:
    """Write until the filesystem has no byte left."""
    chunk = b"\xff" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


def test_disk_filling_up_during_a_merge_is_exit_4_never_a_signal(large_model, tmp_path):
    """Another job fills the volume while shard 1 is being written: before reservation this was SIGBUS."""
    base, adapter = large_model
    with mounted_tmpfs(tmp_path / "small", "300m") as volume:
        out = volume / "out"
        process = subprocess.Popen(
            [sys.executable, "-m", "lora_tools", "merge", base, adapter, "-o", out, "-q", "--max-shard-size", "40MB"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _wait_for_first_shard(out, process)
            process.send_signal(signal.SIGSTOP)  # the other job gets the disk while the merge is mid-shard
            _fill(volume / "other-job")
        finally:
            process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 4, (process.returncode, stderr)  # never -7 (SIGBUS)
        assert_one_error_line(stderr, f"error: {out}/model-", "the disk filled up", output=out)
        assert [p.name for p in volume.iterdir()] == ["other-job"]


# --- the Hub download cache ----------------------------------------------------


def test_full_download_cache_is_exit_4_naming_the_cache(tmp_path):
    from hub_server import FakeHub

    files = {p.name: p.read_bytes() for p in FIXTURE_BASE.iterdir()}
    with FakeHub("hf_token") as hub, mounted_tmpfs(tmp_path / "hf", "100k") as hf_home:
        hub.add_files("org/tiny-llama", files)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0")
        out = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, "-m", "lora_tools", "merge", "org/tiny-llama", FIXTURE_ADAPTER, "-o", out, "-q"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert result.returncode == 4, result.stderr
        # the file being written when it names one (all in the cache), else the repo and the cache
        assert_one_error_line(result.stderr, str(hf_home), "the disk filled up")
        assert not out.exists()
