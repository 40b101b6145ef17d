"""The Hub when the network misbehaves: the real huggingface_hub client against a loopback Hub with faults.

Retries wait milliseconds here (LORATOOL_HUB_RETRY_BASE_SECONDS=0.01, set by `loratool`), except where
the server asks for longer with Retry-After, which must be honoured.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager, suppress
from urllib.parse import unquote, urlparse

import pytest
from hub_server import FakeHub
from layouts_models import sharded_copy, weight_bytes
from test_hub import FIXTURE_ADAPTER, FIXTURE_BASE, TOKEN, _folder_files, loratool

SHARDS = ["--max-shard-size", "60KB"]


@pytest.fixture
def hub():
    with FakeHub(TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    """A sharded base folder, and the bytes a fault-free local merge of the fixture adapter into it gives."""
    import lora_tools

    root = tmp_path_factory.mktemp("sharded")
    plain = sharded_copy(root / "plain")
    lora_tools.merge(plain, [FIXTURE_ADAPTER], root / "merged", device="cpu", max_shard_size="60KB")
    return {"files": _folder_files(plain), "merged": root / "merged", "reference": weight_bytes(root / "merged")}


def _seed(hub: FakeHub, sharded: dict) -> None:
    hub.add_files("org/sharded", sharded["files"])
    hub.add_files("org/tiny-lora", _folder_files(FIXTURE_ADAPTER))


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("hub: ")]


def _paths(hub: FakeHub, method: str, since: int = 0) -> list[str]:
    return [unquote(urlparse(path).path) for verb, path, _ in hub.requests[since:] if verb == method]


def _commits(hub: FakeHub, repo_id: str) -> list[dict[str, bytes]]:
    """The trees of a repo's commits, oldest first (the server keeps them in creation order; one branch here)."""
    return list(hub.repos[repo_id].commits.values())


def _assert_no_duplicate_commits(trees: list[dict[str, bytes]]) -> None:
    """Each commit changes the tree: a retried or re-run commit never lands twice."""
    for before, after in zip(trees, trees[1:], strict=False):
        assert after != before


def test_downloads_survive_503_on_every_first_request_and_a_body_cut_half_way(hub, tmp_path, sharded):
    _seed(hub, sharded)
    hub.faults.first_request_status = 503
    hub.faults.cut_downloads = {"model-00002-of-00003.safetensors"}
    result = loratool(["merge", "org/sharded", "org/tiny-lora", "-o", tmp_path / "out", "-q", *SHARDS], hub.url,
                      tmp_path / "hf")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert weight_bytes(tmp_path / "out") == sharded["reference"]
    notes = _notes(result.stderr)
    assert len(notes) == len(hub.faults.seen) > 10  # one note per injected 503, none silent
    assert all(re.fullmatch(r"hub: HTTP 503 on (GET|HEAD) /\S+, retrying in [\d.]+ s \(attempt 2\)", n) for n in notes)
    assert any("/api/models/org/sharded" in note for note in notes)  # repo info too
    cut = [path for path in _paths(hub, "GET") if path.endswith("model-00002-of-00003.safetensors")]
    assert len(cut) == 3 and not hub.faults.cut_downloads  # 503, cut half-way, fetched again by huggingface_hub


def test_429_with_retry_after_on_repo_info_is_waited_out(hub, tmp_path, sharded):
    _seed(hub, sharded)
    hub.faults.repo_info_429 = 1
    hub.faults.retry_after = "1"
    result = loratool(["inspect", "org/tiny-lora", "--json"], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    (note,) = _notes(result.stderr)
    assert note == "hub: HTTP 429 on GET /api/models/org/tiny-lora, retrying in 1 s (attempt 2)"
    asked = [i for i, (verb, path, _) in enumerate(hub.requests) if path.startswith("/api/models/org/tiny-lora")]
    assert hub.times[asked[1]] - hub.times[asked[0]] >= 1.0  # Retry-After: 1, with a base wait of 0.01 s


def test_push_survives_a_failed_commit_a_lost_commit_answer_and_a_cut_lfs_upload(hub, tmp_path):
    out = tmp_path / "merged"
    hub.faults.commit_500 = 1
    hub.faults.commit_answers_lost = 1  # the retry of a commit that landed must not land twice
    hub.faults.cut_uploads = 1
    result = loratool(["merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", *SHARDS, "--push-to-hub", "me/merged",
                       "--json"], hub.url, tmp_path / "hf", token_env=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert hub.faults.commit_500 == hub.faults.cut_uploads == hub.faults.commit_answers_lost == 0
    local = _folder_files(out)
    assert {k: v for k, v in hub.files("me/merged").items() if k != ".gitattributes"} == local
    notes = _notes(result.stderr)
    assert any(
        re.fullmatch(r"hub: HTTP 500 on POST /api/models/me/merged/commit/main, .*\(attempt 2\)", n) for n in notes
    )
    assert any(re.fullmatch(r"hub: \w+ on PUT /lfs-upload/[0-9a-f]{64}, .*\(attempt 2\)", n) for n in notes), notes
    assert any(
        re.fullmatch(r"hub: RemoteProtocolError on POST /api/models/me/merged/commit/main, .*", n) for n in notes
    )
    weights = [name for name in local if name.endswith(".safetensors")]
    commit_calls = [path for verb, path, _ in hub.requests if verb == "POST" and "/commit/" in path]
    assert len(commit_calls) == len(weights) + 1 + 2  # one per shard, the rest, the 500 and the 412 refused
    trees = _commits(hub, "me/merged")
    assert len(weights) >= 3 and len(trees) == 1 + len(weights) + 1  # initial, one per shard, the rest
    _assert_no_duplicate_commits(trees)


def test_interrupted_push_resumes_with_only_the_missing_files(hub, tmp_path, sharded):
    folder = sharded["merged"]
    local = _folder_files(folder)
    oids = {hashlib.sha256(content).hexdigest(): name for name, content in local.items()}
    weights = sorted(name for name in local if name.endswith(".safetensors"))
    last_shard = weights[-1]
    hub.faults.fail_uploads = {hashlib.sha256(local[last_shard]).hexdigest()}
    first = loratool(["push", folder, "me/m"], hub.url, tmp_path / "hf", token_env=True, retry_seconds=0.3)
    assert first.returncode == 4, first.stderr
    line = first.stderr.strip().splitlines()[-1]
    assert line.startswith("error: me/m: the Hub (127.0.0.1:") and "HTTP 500 after" in line, line
    assert f"the local output is kept at {folder}; `loratool push {folder} me/m` sends only what is missing" in line
    assert [name for name in hub.files("me/m") if name.endswith(".safetensors")] == weights[:-1]  # each kept

    hub.faults.fail_uploads.clear()
    since = len(hub.requests)
    again = loratool(["push", folder, "me/m", "--json"], hub.url, tmp_path / "hf", token_env=True)
    assert again.returncode == 0, again.stderr
    sent = [oids[path.rsplit("/", 1)[1]] for path in _paths(hub, "PUT", since)]
    assert sent == [last_shard]  # the server saw only the missing weight file's bytes
    assert {k: v for k, v in hub.files("me/m").items() if k != ".gitattributes"} == local
    report = json.loads(again.stdout)
    assert report["commits"] == 1 and report["files_unchanged"] == len(weights) - 1  # one weight file left: one commit
    assert report["files_sent"] == sorted(set(local) - set(weights[:-1]))

    since, commits = len(hub.requests), len(hub.repos["me/m"].commits)
    third = loratool(["push", folder, "me/m"], hub.url, tmp_path / "hf", token_env=True)
    assert third.returncode == 0 and "is already on me/m (nothing sent)" in third.stderr, third.stderr
    assert len(hub.repos["me/m"].commits) == commits and not _paths(hub, "PUT", since)
    _assert_no_duplicate_commits(_commits(hub, "me/m"))

    clean = loratool(["push", folder, "me/clean"], hub.url, tmp_path / "hf", token_env=True)
    assert clean.returncode == 0, clean.stderr
    assert hub.files("me/clean") == hub.files("me/m")  # the same content as a push that never failed


def test_a_hub_that_stays_down_ends_with_exit_4_within_the_bound(hub, tmp_path, sharded):
    _seed(hub, sharded)
    hub.faults.everything = 503
    out = tmp_path / "out"
    result = loratool(["merge", "org/sharded", "org/tiny-lora", "-o", out, "-q"], hub.url, tmp_path / "hf",
                      retry_seconds=1.5)  # fmt: skip
    assert result.returncode == 4, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    host = urlparse(hub.url).netloc
    assert re.fullmatch(rf"error: org/sharded: the Hub \({re.escape(host)}\) is unavailable: HTTP 503 after \d+ "
                        r"attempts over \d s; try again later, or retry for longer with LORATOOL_HUB_RETRY_SECONDS",
                        line), line  # fmt: skip
    assert hub.times[-1] - hub.times[0] < 1.5 + 1.0  # the bound, plus at most one last wait's worth
    assert not out.exists() and not list(tmp_path.glob("out*"))
    assert len(_notes(result.stderr)) == len(hub.requests) - 1  # every retry said, the last failure is the error

    push = loratool(["push", FIXTURE_ADAPTER, "me/adapter"], hub.url, tmp_path / "hf", token_env=True,
                    retry_seconds=0.3)  # fmt: skip
    assert push.returncode == 4 and "is unavailable: HTTP 503" in push.stderr and "local output is kept" in push.stderr


def test_every_hub_message(hub, tmp_path, sharded):
    """The table on the Hub faults page, one row at a time: exit code and message."""
    _seed(hub, sharded)
    hub.forbidden.add("org/locked")
    hub.add_files("org/holey", sharded["files"])
    hub.missing_files.add("model-00002-of-00003.safetensors")
    hf = tmp_path / "hf"

    def run(args, endpoint=hub.url, **kwargs):
        result = loratool(args, endpoint, hf, **kwargs)
        return result.returncode, result.stderr.strip().splitlines()[-1]

    assert run(["push", FIXTURE_ADAPTER, "me/a", "--token", "hf_wrong"]) == (4, (
        f"error: me/a: the Hub refused access (HTTP 401); pass --token or set HF_TOKEN to a token that can write to "
        f"this repo; the local output is kept at {FIXTURE_ADAPTER}; `loratool push {FIXTURE_ADAPTER} me/a` sends only "
        "what is missing"))  # fmt: skip
    assert run(["inspect", "org/locked"]) == (4, "error: org/locked: the Hub refused access (HTTP 403); pass --token "
                                                 "or set HF_TOKEN to a token that can read this repo")  # fmt: skip
    since = len(hub.requests)
    assert run(["inspect", "org/nope"]) == (3, "error: org/nope: neither a local path nor a repo on the Hub (or it is "
                                               "private: pass --token or set HF_TOKEN)")  # fmt: skip
    assert len(hub.requests) - since == 1  # a 4xx other than 429 is never retried
    assert run(["inspect", "org/tiny-lora@v9"]) == (3, "error: org/tiny-lora@v9: no such revision on the Hub; check "
                                                       "the branch, tag or commit")  # fmt: skip
    assert run(["merge", "org/holey", FIXTURE_ADAPTER, "-o", tmp_path / "out"]) == (3, (
        "error: org/holey: the Hub has no file model-00002-of-00003.safetensors at this revision (its file list "
        "names it); check the repo"))  # fmt: skip
    hub.faults.repo_info_429, hub.faults.retry_after = 10_000, "0"
    code, line = run(["inspect", "org/tiny-lora"], retry_seconds=0.3)
    assert code == 4 and re.fullmatch(r"error: org/tiny-lora: rate limited by the Hub \(HTTP 429\) after \d+ attempts "
                                      r"over 0 s; wait and run it again, or retry for longer with "
                                      r"LORATOOL_HUB_RETRY_SECONDS", line), line  # fmt: skip
    hub.faults.repo_info_429 = 0
    code, line = run(["inspect", "org/tiny-lora"], endpoint="http://hub.invalid", retry_seconds=0.2)
    assert code == 4 and line.startswith("error: org/tiny-lora: network unreachable: cannot connect to hub.invalid "
                                         "(ConnectError) after ") and "HF_HUB_OFFLINE=1" in line, line  # fmt: skip
    with _hangs_up() as endpoint:
        code, line = run(["inspect", "org/tiny-lora"], endpoint=endpoint, retry_seconds=0.2)
    assert code == 4 and re.fullmatch(r"error: org/tiny-lora: the connection to the Hub \(127.0.0.1:\d+\) kept "
                                      r"failing \(RemoteProtocolError\) after \d+ attempts over 0 s; check the "
                                      r"network", line), line  # fmt: skip
    code, line = run(["inspect", "org/tiny-lora"], offline=True)
    assert code == 4 and "not in the local Hugging Face cache" in line
    hub.gated.add("org/tiny-lora")
    assert run(["inspect", "org/tiny-lora"]) == (4, "error: org/tiny-lora: the repo is gated; accept its terms on the "
                                                    "Hub and pass --token")  # fmt: skip
    hub.faults.everything = 400
    since = len(hub.requests)
    assert run(["inspect", "org/tiny-lora"]) == (4, "error: org/tiny-lora: the Hub answered HTTP 400 (injected HTTP "
                                                    "400); rerun with LORATOOL_DEBUG=1 for details")  # fmt: skip
    assert len(hub.requests) - since == 1
    assert not (tmp_path / "out").exists()


@contextmanager
def _hangs_up():
    """An endpoint that accepts each connection and closes it without answering."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with suppress(TimeoutError):
                connection, _ = listener.accept()
                connection.recv(65536)
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_retry_settings_are_checked(hub, tmp_path, monkeypatch):
    for value in ("soon", "-1", "nan"):
        monkeypatch.setenv("LORATOOL_HUB_RETRY_SECONDS", value)
        from lora_tools.errors import OptionValueError
        from lora_tools.io.hub_retry import RetryPolicy

        with pytest.raises(OptionValueError, match=f"LORATOOL_HUB_RETRY_SECONDS={value!r}: expected a number"):
            RetryPolicy.from_environment()
    policy = RetryPolicy(seconds=60, base=1)
    waits = [policy.backoff(attempt) for attempt in range(1, 10)]
    assert all(min(60, 2 ** (n - 1)) / 2 <= w <= min(60, 2 ** (n - 1)) for n, w in enumerate(waits, 1)), waits
    assert len({round(policy.backoff(3), 6) for _ in range(20)}) > 1  # jitter


def test_a_truncated_cached_shard_is_fetched_again_online_and_named_offline(hub, tmp_path, sharded):
    _seed(hub, sharded)
    hf = tmp_path / "hf"
    args = ["merge", "org/sharded", "org/tiny-lora", "-q", *SHARDS, "-o"]
    assert loratool([*args, tmp_path / "first"], hub.url, hf).returncode == 0
    (snapshot,) = (hf / "hub" / "models--org--sharded" / "snapshots").iterdir()
    shard = snapshot / "model-00002-of-00003.safetensors"
    size = shard.stat().st_size
    os.truncate(shard.resolve(), size // 2)

    offline = loratool([*args, tmp_path / "offline"], hub.url, hf, offline=True)
    assert offline.returncode == 3, offline.stderr
    assert f"error: {shard}: tensor data runs to byte" in offline.stderr and "(truncated?)" in offline.stderr
    assert not (tmp_path / "offline").exists()

    online = loratool([*args, tmp_path / "online"], hub.url, hf)
    assert online.returncode == 0, online.stderr
    assert (f"hub: org/sharded: the cached model-00002-of-00003.safetensors is {size // 2} bytes, the Hub lists "
            f"{size}; downloading it again") in _notes(online.stderr)  # fmt: skip
    assert shard.stat().st_size == size and weight_bytes(tmp_path / "online") == sharded["reference"]


def test_budget_of_zero_means_one_try(hub, tmp_path, sharded):
    _seed(hub, sharded)
    hub.faults.everything = 502
    started = time.monotonic()
    result = loratool(["inspect", "org/tiny-lora"], hub.url, tmp_path / "hf", retry_seconds=0)
    assert result.returncode == 4 and "HTTP 502 after 1 attempt over 0 s" in result.stderr, result.stderr
    assert len(hub.requests) == 1 and not _notes(result.stderr) and time.monotonic() - started < 60


def test_a_connection_that_cannot_be_made_is_retried_for_at_most_30_s(monkeypatch):
    """A refused connection (nothing listens) gives up after CONNECT_SECONDS of backoff, not the 300 s a busy
    Hub gets: a warm cache is not kept waiting five minutes behind an unplugged network. The waits run on a
    virtual clock; the connections are real."""
    import socket

    from lora_tools.io import hub_retry

    class Clock:
        now = 0.0

        def monotonic(self):
            return self.now

        def sleep(self, seconds):
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(hub_retry, "time", clock)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("LORATOOL_HUB_RETRY_SECONDS", "300")
    monkeypatch.setenv("LORATOOL_HUB_RETRY_BASE_SECONDS", "1")
    notes: list[str] = []
    hub_retry.set_retry_reporter(notes.append)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        with pytest.raises(hub_retry.HubRetriesExhausted) as caught:
            hub_retry._retrying_client().get(f"http://127.0.0.1:{port}/api/models/org/x")
    finally:
        hub_retry.set_retry_reporter(None)
        hub_retry._gave_up.clear()
    assert 5 < clock.now <= hub_retry.CONNECT_SECONDS == 30  # waits 1, 2, 4, 8 … (jittered), never to 300 s
    assert len(notes) >= 4 and all("ConnectError" in n for n in notes), notes
    assert "ConnectError" in str(caught.value)
