"""The Hugging Face Hub: repo ids as inputs, the client, and its errors (`commands.push` publishes).

Everything goes through `huggingface_hub` (its cache, its token lookup, its
offline mode); `hub_client` is the one place an `HfApi` is built. Errors are
mapped here: an id that does not exist is invalid input (exit 3); network,
permission and token problems are environment errors (exit 4). Tokens are
never put into messages, reports or files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EnvironmentProblem, InvalidInputError
from ..version import __version__

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = [
    "HubError",
    "RepoNotFoundError",
    "is_repo_id",
    "is_repo_name",
    "resolve_input",
    "hub_client",
    "transport_errors",
]

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9])(?:@(?P<revision>[^\s@]+))?$")


class HubError(EnvironmentProblem):
    """The Hub could not be reached, refused the request, or no token was available."""


class RepoNotFoundError(InvalidInputError, FileNotFoundError):
    """A repo id (or revision) that does not exist on the Hub."""


def transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def is_repo_id(spec: str) -> bool:
    """`org/name` or `org/name@revision`, and not an existing local path."""
    return not Path(spec).exists() and _REPO_ID.match(str(spec)) is not None


def is_repo_name(text: str) -> bool:
    """`org/name` exactly, with no revision: a repo to push to."""
    return _REPO_ID.match(text) is not None and "@" not in text


def hub_client(token: str | None = None) -> HfApi:
    """The one `HfApi` lora_tools uses (library_name identifies the tool to the Hub)."""
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="loratool", library_version=__version__)


def resolve_input(
    spec: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> tuple[Path, str | None]:
    """A local path for `spec`, downloading repo ids into the shared HF cache.

    Returns:
        (local path, the repo id when `spec` was one). An existing local path always wins.

    Raises:
        RepoNotFoundError: the repo or revision does not exist (exit 3).
        HubError: network failure, no access, or offline without a cached copy (exit 4).
    """
    text = str(spec)
    if not is_repo_id(text):
        return Path(spec), None
    match = _REPO_ID.match(text)
    repo_id, revision = match.group("repo"), match.group("revision") or revision
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = _download_one_weight_set(repo_id, revision, token)
    except RevisionNotFoundError as exc:
        raise RepoNotFoundError(f"{where}: no such revision on the Hub; check the branch, tag or commit") from exc
    except GatedRepoError as exc:
        raise HubError(f"{where}: the repo is gated; accept its terms on the Hub and pass --token") from exc
    except RepositoryNotFoundError as exc:
        raise RepoNotFoundError(
            f"{where}: neither a local path nor a repo on the Hub (or it is private: pass --token or set HF_TOKEN)"
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise HubError(
            f"{where}: not in the local Hugging Face cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE is set or the network is down); download it once while online"
        ) from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise HubError(f"{where}: the Hub answered HTTP {status}; check your token's access to this repo") from exc
    except transport_errors() as exc:
        from huggingface_hub.constants import HF_HUB_CACHE

        from ..errors import os_error_problem

        problem = os_error_problem(exc, where=f"{where}: the Hugging Face download cache {HF_HUB_CACHE}")
        if problem is not None:  # a full disk, quota or read-only cache: not the network
            raise problem from exc
        raise HubError(f"{where}: cannot reach the Hub ({type(exc).__name__}); check the network") from exc
    return Path(path), repo_id


def _download_one_weight_set(repo_id: str, revision: str | None, token: str | None) -> str:
    """Download configs, tokenizer files and exactly one weight set of a repo; return the snapshot folder.

    The repo's file list comes from one API call; the choice is `weightsets.repo_files_to_fetch`'s
    (transformers' order), and an index's shards are fetched once the index is here. Offline, or when
    the Hub cannot be reached, the cached snapshot is used as it is (readers make the same choice).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from .checkpoint import read_json
    from .weightsets import repo_files_to_fetch, shard_names

    try:
        listing = hub_client(token).model_info(repo_id, revision=revision, files_metadata=False)
    except HfHubHTTPError as exc:  # not found, no access: the caller says what it means; a Hub down: the cache
        if getattr(exc.response, "status_code", 0) < 500:
            raise
        listing = None
    except (OfflineModeIsEnabled, *transport_errors()):
        listing = None
    if listing is None:
        return snapshot_download(
            repo_id, revision=revision, token=token, local_files_only=True, allow_patterns=[], library_name="loratool"
        )
    files, indexes = repo_files_to_fetch(sibling.rfilename for sibling in listing.siblings or [])
    folder = snapshot_download(
        repo_id, revision=revision, token=token, allow_patterns=_exactly(files), library_name="loratool"
    )
    available = {sibling.rfilename for sibling in listing.siblings or []}
    shards = []
    for index in indexes:
        weight_map = read_json(Path(folder) / index, "index").get("weight_map")
        if isinstance(weight_map, dict):
            shards += [name for name in shard_names(index.rpartition("/")[0], weight_map) if name in available]
    if shards:  # the same commit as the first call (its folder is named by the commit hash)
        snapshot_download(
            repo_id, revision=Path(folder).name, token=token, allow_patterns=_exactly(shards), library_name="loratool"
        )
    return folder


def _exactly(names: list[str]) -> list[str]:
    """allow_patterns matching exactly these repo paths (fnmatch's special characters escaped)."""
    import glob

    return [glob.escape(name) for name in names]
