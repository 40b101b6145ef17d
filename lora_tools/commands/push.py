"""`push`: publish a folder to the Hugging Face Hub, sending only what the Hub does not already hold.

A push compares the folder with the branch (sizes and hashes from one repo-info call) and sends only
the files that differ. An output with two or more weight files to send is committed one weight file at
a time, then everything else (index, configs, card) in a final commit that completes the set; anything
smaller is one commit. So a push that fails part-way keeps every finished weight file on the Hub, and
running it again sends only what is missing; a folder that is already there makes no commit at all.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..io.hub import HubError, hub_client, hub_errors, is_repo_name

__all__ = ["PushReport", "push"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class PushReport:
    repo_id: str
    revision: str
    commit_url: str
    pull_request_url: str | None
    private: bool
    commits: int
    files_sent: list[str]
    files_unchanged: int

    def to_dict(self) -> dict:
        return asdict(self)


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushReport:
    """Publish a folder: create the repo (and branch) if needed, then send the files the Hub lacks.

    Weight files go one commit each when two or more are sent, then the rest in a final commit
    (a pull request is always one commit); see the module docstring.

    Raises:
        HubError: no token, no access, repo missing, rate limited, Hub unavailable or network failure —
            the local folder is kept, and running the push again resumes it.
    """
    from huggingface_hub import get_token

    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"{folder}: not a folder to push")
    if not is_repo_name(repo_id):
        raise InvalidInputError(f"{repo_id!r} is not a repo id (expected org/name)")
    kept = f"; the local output is kept at {folder}"
    if token is None and get_token() is None:
        raise HubError(
            f"no Hugging Face token to push {repo_id}: pass --token, set HF_TOKEN, or run `hf auth login`{kept}"
        )
    api = hub_client(token)
    branch = revision or "main"
    message = commit_message or f"Upload {folder.name} with loratool"
    again = f"loratool push {folder} {repo_id}" + (f" --revision {branch}" if branch != "main" else "")
    resume = f"{kept}; `{again}` sends only what is missing"
    with hub_errors(repo_id, writing=True, suffix=resume):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        head = api.model_info(repo_id, revision=branch, files_metadata=True)
        changed, unchanged = _changed_files(folder, head)
        parent, urls = head.sha, []
        for batch, title in _batches(changed, message, create_pr):
            parent, commit_url, pr_url = _commit(api, repo_id, branch, create_pr, batch, title, parent)
            urls.append((commit_url, pr_url))
    commit_url = urls[-1][0] if urls else f"{api.endpoint}/{repo_id}/commit/{head.sha}"
    pr_url = urls[-1][1] if urls else None
    sent = sorted(op.path_in_repo for op in changed)
    return PushReport(repo_id, branch, commit_url, pr_url, private, len(urls), sent, unchanged)


def _changed_files(folder: Path, head) -> tuple[list, int]:
    """The folder's files as commit operations, less those the branch already holds byte for byte."""
    from huggingface_hub import CommitOperationAdd

    remote = {sibling.rfilename: sibling for sibling in head.siblings or []}
    changed, unchanged = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _ignored(p.relative_to(folder))):
        name = path.relative_to(folder).as_posix()
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=path)
        if _same(operation, path, remote.get(name)):
            unchanged += 1
        else:
            changed.append(operation)
    return changed, unchanged


def _ignored(relative: Path) -> bool:
    """What upload_folder leaves out by default: git's folder and huggingface_hub's own cache folder."""
    return ".git" in relative.parts or relative.parts[:2] == (".cache", "huggingface")


def _same(operation, path: Path, sibling) -> bool:
    """Whether the Hub's file is this one: its LFS sha256, or its git blob id for a regular file."""
    if sibling is None or sibling.size != operation.upload_info.size:
        return False
    if sibling.lfs is not None:
        return sibling.lfs.sha256 == operation.upload_info.sha256.hex()
    data = path.read_bytes()
    return sibling.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _batches(changed: list, message: str, create_pr: bool) -> list[tuple[list, str]]:
    """One commit per weight file when two or more are sent (then the rest), else one commit."""
    weights = [op for op in changed if op.path_in_repo.endswith(_WEIGHT_SUFFIXES)]
    if create_pr or len(weights) < 2:
        return [(changed, message)] if changed else []
    rest = [op for op in changed if op not in weights]
    batches = [([op], f"{message} ({op.path_in_repo})") for op in weights]
    return batches + ([(rest, message)] if rest else [])


def _commit(api, repo_id: str, branch: str, create_pr: bool, operations: list, title: str,
            parent: str) -> tuple[str, str, str | None]:  # fmt: skip
    """Commit `operations` on top of `parent`; return (new head, commit URL, pull request URL).

    The commit names its parent, so a commit call that landed but whose answer was lost, then sent
    again by the retries, is refused (HTTP 412) instead of landing twice; the branch is then asked
    whether it holds these files, and if it does the commit counts as made.
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        commit = api.create_commit(repo_id, operations=operations, commit_message=title, revision=branch,
                                   create_pr=create_pr, parent_commit=None if create_pr else parent)  # fmt: skip
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) != 412:
            raise
        head = api.model_info(repo_id, revision=branch, files_metadata=True)
        remote = {sibling.rfilename: sibling for sibling in head.siblings or []}
        if not all(_same(op, Path(op.path_or_fileobj), remote.get(op.path_in_repo)) for op in operations):
            raise
        return head.sha, f"{api.endpoint}/{repo_id}/commit/{head.sha}", None
    return commit.oid, str(commit.commit_url), commit.pr_url
