"""Hub in and out, against a loopback server speaking the Hub's HTTP API to the real huggingface_hub.

Each command runs in its own process: huggingface_hub reads HF_ENDPOINT,
HF_HOME and HF_HUB_OFFLINE when it is imported.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from conftest import REPO, run_cli
from hub_server import FakeHub
from layouts_models import sharded_copy, weight_bytes

TOKEN = "hf_loopbackSecretToken123"
FIXTURE_BASE = REPO / "fixtures" / "tiny-llama"
FIXTURE_ADAPTER = REPO / "fixtures" / "tiny-llama-lora"


@pytest.fixture
def hub():
    with FakeHub(TOKEN) as server:
        yield server


def loratool(args: list, hub_url: str, hf_home: Path, *, offline: bool = False, token_env: bool = False,
             retry_seconds: float = 3):  # fmt: skip
    """Run loratool in its own process against `hub_url`; retries wait milliseconds, for `retry_seconds` at most."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LORATOOL_HUB_"))}
    env.update(
        HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="1" if offline else "0"
    )
    env.update(LORATOOL_HUB_RETRY_SECONDS=str(retry_seconds), LORATOOL_HUB_RETRY_BASE_SECONDS="0.01")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if token_env:
        env["HF_TOKEN"] = TOKEN
    return subprocess.run(
        [sys.executable, "-m", "lora_tools", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _seed(hub: FakeHub) -> None:
    hub.add_files("org/tiny-llama", _folder_files(FIXTURE_BASE))
    hub.add_files("org/tiny-lora", _folder_files(FIXTURE_ADAPTER), private=True)


def test_merge_push_creates_private_repo_with_shards_index_config_and_card(hub, tmp_path):
    out = tmp_path / "merged"
    result = loratool(
        ["merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--max-shard-size", "60KB",
         "--push-to-hub", "me/merged", "--private", "--token", TOKEN, "--json"],
        hub.url, tmp_path / "hf",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["push"]["repo_id"] == "me/merged" and report["push"]["private"] is True
    assert hub.repos["me/merged"].private
    pushed = hub.files("me/merged")
    local = _folder_files(out)
    assert len(report["files"]) > 1 and all(name in pushed for name in report["files"])
    for name in ("model.safetensors.index.json", "config.json", "README.md", "tokenizer_config.json"):
        assert pushed[name] == local[name], name
    card = pushed["README.md"].decode()
    assert card.startswith("---\n") and 'base_model: "tiny-llama"' in card and "library_name: transformers" in card
    assert "- merge" in card and "loratool merge tiny-llama tiny-llama-lora" in card
    _assert_no_token(result, out, hub)


def _assert_no_token(result, out: Path, hub: FakeHub) -> None:
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for name, content in _folder_files(out).items():
        assert TOKEN.encode() not in content, name
    for repo in hub.repos.values():
        for tree in repo.commits.values():
            assert all(TOKEN.encode() not in content for content in tree.values())


def test_push_existing_folder_and_create_pr(hub, tmp_path):
    first = loratool(["push", FIXTURE_ADAPTER, "me/adapter", "-q"], hub.url, tmp_path / "hf", token_env=True)
    assert first.returncode == 0, first.stderr
    assert set(_folder_files(FIXTURE_ADAPTER)) <= set(hub.files("me/adapter"))
    pr = loratool(
        ["push", FIXTURE_BASE, "me/adapter", "--create-pr", "--commit-message", "add base", "--json", "-q"],
        hub.url, tmp_path / "hf", token_env=True,
    )  # fmt: skip
    assert pr.returncode == 0, pr.stderr
    report = json.loads(pr.stdout)
    assert report["pull_request_url"].endswith("/discussions/1")
    assert "model.safetensors" in hub.files("me/adapter", "refs/pr/1")
    assert "model.safetensors" not in hub.files("me/adapter", "main")
    assert hub.repos["me/adapter"].messages[hub.repos["me/adapter"].branches["refs/pr/1"]] == "add base"
    assert TOKEN not in pr.stdout + pr.stderr + first.stdout + first.stderr


def test_merge_from_repo_ids_equals_local_merge_and_works_offline_once_cached(hub, tmp_path):
    _seed(hub)
    hf_home = tmp_path / "hf"
    remote = loratool(["merge", "org/tiny-llama", "org/tiny-lora", "-o", tmp_path / "remote", "-q", "--token", TOKEN],
                      hub.url, hf_home)  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    local = loratool(["merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", tmp_path / "local", "-q"], hub.url, hf_home)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "remote" / "model.safetensors").read_bytes() == (
        tmp_path / "local" / "model.safetensors"
    ).read_bytes()
    card = (tmp_path / "remote" / "README.md").read_text()
    assert 'base_model: "org/tiny-llama"' in card and "loratool merge org/tiny-llama org/tiny-lora" in card

    downloads = len(hub.requests)
    warm = loratool(["merge", "org/tiny-llama", "org/tiny-lora", "-o", tmp_path / "offline", "-q"], hub.url, hf_home,
                    offline=True)  # fmt: skip
    assert warm.returncode == 0, warm.stderr
    assert len(hub.requests) == downloads  # nothing asked of the Hub
    cold = loratool(["merge", "org/tiny-llama", "org/tiny-lora", "-o", tmp_path / "cold", "-q"], hub.url,
                    tmp_path / "empty-cache", offline=True)  # fmt: skip
    assert cold.returncode == 4, cold.stderr
    assert "org/tiny-llama: not in the local Hugging Face cache" in cold.stderr and "HF_HUB_OFFLINE" in cold.stderr
    assert not (tmp_path / "cold").exists()


def test_revision_syntax_and_missing_repo(hub, tmp_path):
    _seed(hub)
    hub.add_files("org/tiny-llama", {"config.json": b"{}"}, branch="broken")
    good = loratool(["inspect", "--json", FIXTURE_BASE], hub.url, tmp_path / "hf")
    assert good.returncode == 0
    missing = loratool(["merge", "org/nope", FIXTURE_ADAPTER, "-o", tmp_path / "out", "-q"], hub.url, tmp_path / "hf")
    assert missing.returncode == 3, missing.stderr
    assert "org/nope: neither a local path nor a repo on the Hub" in missing.stderr
    bad_revision = loratool(["merge", "org/tiny-llama@v9", FIXTURE_ADAPTER, "-o", tmp_path / "out", "-q"], hub.url,
                            tmp_path / "hf")  # fmt: skip
    assert bad_revision.returncode == 3 and "no such revision" in bad_revision.stderr
    private_without_token = loratool(["merge", FIXTURE_BASE, "org/tiny-lora", "-o", tmp_path / "out", "-q"], hub.url,
                                     tmp_path / "hf")  # fmt: skip
    assert private_without_token.returncode == 3 and "pass --token" in private_without_token.stderr
    assert not (tmp_path / "out").exists()


def test_forbidden_and_not_found_pushes_exit_4_and_keep_the_output(hub, tmp_path):
    hub.forbidden.add("them/model")
    hub.missing_namespaces.add("ghost")
    for repo_id, needle in (("them/model", "HTTP 403"), ("ghost/model", "repo not found")):
        out = tmp_path / repo_id.replace("/", "-")
        result = loratool(["merge", FIXTURE_BASE, FIXTURE_ADAPTER, "-o", out, "-q", "--push-to-hub", repo_id],
                          hub.url, tmp_path / "hf", token_env=True)  # fmt: skip
        assert result.returncode == 4, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: {repo_id}:") and needle in line, line
        assert f"the local output is kept at {out}" in line
        assert (out / "model.safetensors").is_file()
        assert TOKEN not in result.stderr


def test_no_token_and_no_network(hub, tmp_path):
    result = loratool(["push", FIXTURE_ADAPTER, "me/adapter"], hub.url, tmp_path / "hf")
    assert result.returncode == 4 and "no Hugging Face token" in result.stderr and "HF_TOKEN" in result.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    down = loratool(["push", FIXTURE_ADAPTER, "me/adapter", "--token", TOKEN], dead, tmp_path / "hf")
    assert down.returncode == 4 and "network unreachable: cannot connect to 127.0.0.1" in down.stderr, down.stderr
    fetch = loratool(["merge", "org/tiny-llama", FIXTURE_ADAPTER, "-o", tmp_path / "out", "-q"], dead, tmp_path / "hf")
    assert fetch.returncode == 4, fetch.stderr
    assert "Traceback" not in down.stderr + fetch.stderr


def test_extract_push_writes_a_peft_card(hub, tmp_path):
    out = tmp_path / "extracted"
    result = loratool(["resize", FIXTURE_ADAPTER, "-o", out, "--rank", "2", "-q", "--push-to-hub", "me/small",
                       "--push-branch", "dev"], hub.url, tmp_path / "hf", token_env=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = hub.files("me/small", "dev")["README.md"].decode()
    assert "library_name: peft" in card and "- peft" in card and 'base_model: "fixtures/tiny-llama"' in card
    assert "adapter_model.safetensors" in hub.files("me/small", "dev")


def _resolved_files(hub: FakeHub, repo_id: str) -> set[str]:
    """Every file of `repo_id` the client asked the server for (HEAD or GET), from the server's request log."""
    pattern = re.compile(rf"^/{re.escape(repo_id)}/resolve/[^/]+/(?P<file>.+)$")
    found = set()
    for _, path, _ in hub.requests:
        match = pattern.match(unquote(urlparse(path).path))
        if match:
            found.add(match.group("file"))
    return found


def _snapshot(hf_home: Path, repo_id: str) -> Path:
    (snapshot,) = (hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()
    return snapshot


def test_sharded_base_from_a_real_hf_cache_online_offline_and_by_snapshot_path(hub, tmp_path):
    """The cache holds relative symlinks into ../../blobs; every way in gives the plain folder's bytes."""
    import lora_tools

    plain = sharded_copy(tmp_path / "plain")
    hub.add_files("org/sharded", _folder_files(plain))
    hub.add_files("org/tiny-lora", _folder_files(FIXTURE_ADAPTER))
    hf_home = tmp_path / "hf"
    shards = ["--max-shard-size", "60KB"]
    online = loratool(["merge", "org/sharded", "org/tiny-lora", "-o", tmp_path / "online", "-q", *shards], hub.url,
                      hf_home)  # fmt: skip
    assert online.returncode == 0, online.stderr
    asked = len(hub.requests)
    offline = loratool(["merge", "org/sharded", "org/tiny-lora", "-o", tmp_path / "offline", "-q", *shards], hub.url,
                       hf_home, offline=True)  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert len(hub.requests) == asked

    snapshot, adapter_snapshot = _snapshot(hf_home, "org/sharded"), _snapshot(hf_home, "org/tiny-lora")
    shard = snapshot / "model-00001-of-00003.safetensors"
    assert shard.is_symlink() and os.readlink(shard).startswith("../../blobs/")
    lora_tools.merge(snapshot, [adapter_snapshot], tmp_path / "snapshot", device="cpu", max_shard_size="60KB")
    lora_tools.merge(plain, [FIXTURE_ADAPTER], tmp_path / "local", device="cpu", max_shard_size="60KB")
    reference = weight_bytes(tmp_path / "local")
    assert "model.safetensors.index.json" in reference and len(reference) > 3
    for way in ("online", "offline", "snapshot"):
        assert weight_bytes(tmp_path / way) == reference, way

    by_id = loratool(["inspect", "--json", "org/sharded"], hub.url, hf_home, offline=True)
    assert by_id.returncode == 0, by_id.stderr
    by_path = run_cli(["inspect", "--json", snapshot])
    assert by_path.exit_code == 0, by_path.stderr
    assert json.loads(by_id.stdout) == json.loads(by_path.stdout)
    assert json.loads(by_id.stdout)["files"] == [f"model-0000{n}-of-00003.safetensors" for n in (1, 2, 3)]


def test_a_download_fetches_one_weight_set_with_configs_and_tokenizer(hub, tmp_path):
    import torch
    from safetensors.torch import load_file

    plain = sharded_copy(tmp_path / "plain")
    files = _folder_files(plain)
    state = load_file(FIXTURE_BASE / "model.safetensors")
    duplicate = tmp_path / "pytorch_model.bin"
    torch.save(state, duplicate)
    wanted = set(files) | {"tokenizer.json", "chat_template.jinja", "special_tokens_map.json"}
    files.update({
        "tokenizer.json": b'{"version": "1.0"}', "chat_template.jinja": b"{{ messages }}",
        "special_tokens_map.json": b"{}", "pytorch_model.bin": duplicate.read_bytes(),
        "consolidated.safetensors": (FIXTURE_BASE / "model.safetensors").read_bytes(),
        "original/consolidated.00.pth": duplicate.read_bytes(), "original/params.json": b"{}",
        "original/tokenizer.model": b"sentencepiece", "model-q4.gguf": b"GGUF", "onnx/model.onnx": b"onnx",
        "onnx/config.json": b"{}", "flax_model.msgpack": b"msgpack", "tf_model.h5": b"h5", "README.md": b"# card",
    })  # fmt: skip
    hub.add_files("org/many", files)
    result = loratool(["merge", "org/many", FIXTURE_ADAPTER, "-o", tmp_path / "out", "-q"], hub.url, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert _resolved_files(hub, "org/many") == wanted
    import lora_tools

    lora_tools.merge(plain, [FIXTURE_ADAPTER], tmp_path / "local", device="cpu")
    assert weight_bytes(tmp_path / "out") == weight_bytes(tmp_path / "local")
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"tokenizer.json", "chat_template.jinja", "config.json"}
