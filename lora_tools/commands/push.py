"""`push`: publish a folder to the Hugging Face Hub as one commit."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..io.hub import HubError, hub_client, is_repo_name, transport_errors

__all__ = ["PushReport", "push"]


@dataclass(frozen=True)
class PushReport:
    repo_id: str
    revision: str
    commit_url: str
    pull_request_url: str | None
    private: bool

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
    """Publish a folder as one commit: create the repo (and branch) if needed, then upload everything.

    Raises:
        HubError: no token, no access, repo missing, or network failure — the local folder is kept.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

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
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=branch,
            create_pr=create_pr,
            commit_message=commit_message or f"Upload {folder.name} with loratool",
        )
    except RepositoryNotFoundError as exc:
        raise HubError(f"{repo_id}: repo not found on the Hub, or your token cannot write to it{kept}") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise HubError(
                f"{repo_id}: the Hub refused the push (HTTP {status}); use a token with write access to this repo{kept}"
            ) from exc
        raise HubError(f"{repo_id}: the push failed (HTTP {status}){kept}") from exc
    except transport_errors() as exc:
        raise HubError(f"{repo_id}: cannot reach the Hub ({type(exc).__name__}){kept}") from exc
    return PushReport(repo_id, branch, str(commit.commit_url), commit.pr_url, private)
