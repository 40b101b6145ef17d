"""The Hugging Face Hub: repo ids as inputs, the client, and its errors (`commands.push` publishes).

Everything goes through `huggingface_hub` (its cache, its token lookup, its
offline mode); `hub_client` is the one place an `HfApi` is built. Errors are
mapped here (`hub_problem`, one table): an id that does not exist is invalid
input (exit 3); network, permission, token, rate-limit and Hub-down problems are
environment errors (exit 4). Every request is retried as `hub_retry` says.
Tokens are never put into messages, reports or files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EnvironmentProblem, InvalidInputError, LoraToolError, os_error_problem
from ..version import __version__
from .hub_retry import RETRY_SECONDS_VARIABLE, HubRetriesExhausted, hub_note, install_retries

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = [
    "HubError",
    "RepoNotFoundError",
    "is_repo_id",
    "is_repo_name",
    "resolve_input",
    "hub_client",
    "hub_errors",
    "hub_problem",
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

    install_retries()
    return HfApi(token=token, library_name="loratool", library_version=__version__)


def resolve_input(
    spec: str | os.PathLike, *, revision: str | None = None, token: str | None = None
) -> tuple[Path, str | None]:
    """A local path for `spec`, downloading repo ids into the shared HF cache.

    Returns:
        (local path, the repo id when `spec` was one). An existing local path always wins.

    Raises:
        RepoNotFoundError: the repo, revision or a listed file does not exist (exit 3).
        HubError: network failure, no access, rate limited, Hub unavailable, or offline without a cached copy
            (exit 4); see `hub_problem`.
    """
    text = str(spec)
    if not is_repo_id(text):
        return Path(spec), None
    match = _REPO_ID.match(text)
    repo_id, revision = match.group("repo"), match.group("revision") or revision
    where = f"{repo_id}@{revision}" if revision else repo_id
    install_retries()
    with hub_errors(where):
        path = _download_one_weight_set(repo_id, revision, token, where)
    return Path(path), repo_id


@contextmanager
def hub_errors(where: str, *, writing: bool = False, suffix: str = "") -> Iterator[None]:
    """Turn what huggingface_hub raises inside the block into the one-line error `hub_problem` words."""
    try:
        yield
    except LoraToolError:
        raise
    except Exception as exc:
        problem = hub_problem(exc, where, writing=writing, suffix=suffix)
        if problem is None:
            raise
        raise problem from exc


#: Retries that ran out, by the last answer (429, 5xx) or the connection error's class: the message after "REPO: ".
_GAVE_UP = {
    "429": "rate limited by the Hub (HTTP 429) after {attempts} over {seconds} s; wait and run it "
    f"again, or retry for longer with {RETRY_SECONDS_VARIABLE}",
    "5xx": "the Hub ({host}) is unavailable: HTTP {status} after {attempts} over {seconds} s; try "
    f"again later, or retry for longer with {RETRY_SECONDS_VARIABLE}",
    "ConnectError": "network unreachable: cannot connect to {host} ({cause}) after {attempts} over "
    "{seconds} s; check the network and HF_ENDPOINT{offline}",
    "other": "the connection to the Hub ({host}) kept failing ({cause}) after {attempts} over {seconds} s; "
    "check the network",
}


def hub_problem(exc: BaseException, where: str, *, writing: bool = False, suffix: str = "") -> LoraToolError | None:
    """The error to report for a Hub failure, or None when `exc` is not one (the table on the Hub faults page).

    401/403: token or access (4); 404: the repo, revision or file, named (3; 4 when pushing: no repo to write
    to is an access problem); 429 and 5xx once retries ran out (4); connection and DNS errors (4); offline with
    a cold cache (4). A full or read-only download cache is the disk's problem (`os_error_problem`).
    """
    for cause in _causes(exc):  # huggingface_hub wraps some failures (an LFS upload: RuntimeError from ours)
        problem = _hub_problem(cause, where, writing=writing, suffix=suffix)
        if problem is not None:
            return problem
    return None


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__  # `raise … from`, as huggingface_hub wraps; never what was merely being handled


def _hub_problem(exc: BaseException, where: str, *, writing: bool, suffix: str) -> LoraToolError | None:
    from huggingface_hub import errors as hub

    def said(kind: type[LoraToolError], message: str) -> LoraToolError:
        return kind(f"{where}: {message}{suffix}")

    if isinstance(exc, HubRetriesExhausted):
        return said(HubError, _gave_up(exc, writing))
    if isinstance(exc, hub.RevisionNotFoundError):
        return said(RepoNotFoundError, "no such revision on the Hub; check the branch, tag or commit")
    if isinstance(exc, hub.GatedRepoError):
        return said(HubError, "the repo is gated; accept its terms on the Hub and pass --token")
    if isinstance(exc, hub.RepositoryNotFoundError):
        if writing:
            return said(HubError, "repo not found on the Hub, or your token cannot write to it")
        return said(RepoNotFoundError, "neither a local path nor a repo on the Hub (or it is private: pass --token "
                    "or set HF_TOKEN)")  # fmt: skip
    if isinstance(exc, hub.RemoteEntryNotFoundError):
        return said(RepoNotFoundError, f"the Hub has no file {_file_of(exc)} at this revision (its file list names "
                    "it); check the repo")  # fmt: skip
    if isinstance(exc, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
        return said(HubError, "not in the local Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE "
                    "is set or the network is down); download it once while online")  # fmt: skip
    if isinstance(exc, hub.HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        if status in (401, 403):
            access = "write to" if writing else "read"
            return said(HubError, f"the Hub refused access (HTTP {status}); pass --token or set HF_TOKEN to a token "
                        f"that can {access} this repo")  # fmt: skip
        return said(HubError, f"the Hub answered HTTP {status} ({_hub_message(exc)}); rerun with LORATOOL_DEBUG=1 "
                    "for details")  # fmt: skip
    if isinstance(exc, transport_errors()):
        from huggingface_hub.constants import HF_HUB_CACHE

        problem = os_error_problem(exc, where=f"{where}: the Hugging Face download cache {HF_HUB_CACHE}")
        if problem is not None:  # a full disk, quota or read-only cache: not the network
            return problem
        return said(HubError, f"cannot reach the Hub ({type(exc).__name__}); check the network")
    return None


def _gave_up(exc: HubRetriesExhausted, writing: bool) -> str:
    key = "429" if exc.status == 429 else "5xx" if exc.status else exc.cause
    offline = "" if writing else ", or set HF_HUB_OFFLINE=1 to use the cache"
    return _GAVE_UP.get(key, _GAVE_UP["other"]).format(
        attempts=f"{exc.attempts} attempt{'' if exc.attempts == 1 else 's'}",
        seconds=f"{exc.seconds:.0f}",
        host=exc.host,
        status=exc.status,
        cause=exc.cause,
        offline=offline,
    )


def _file_of(exc: BaseException) -> str:
    """The repo path a `/resolve/<revision>/<file>` request asked for."""
    from urllib.parse import unquote, urlparse

    url = str(getattr(getattr(exc, "response", None), "url", "") or "")
    path = unquote(urlparse(url).path)
    return path.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in path else "(unnamed)"


def _hub_message(exc: BaseException) -> str:
    message = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
    return message.strip()[:200]


def _download_one_weight_set(repo_id: str, revision: str | None, token: str | None, where: str) -> str:
    """Download configs, tokenizer files and exactly one weight set of a repo; return the snapshot folder.

    The repo's file list (with sizes) comes from one API call; the choice is `weightsets.repo_files_to_fetch`'s
    (transformers' order), and an index's shards are fetched once the index is here. Offline, or when the
    Hub cannot be reached after retrying, the cached snapshot is used as it is (readers make the same choice).
    Every fetched file's size is checked against the Hub's record: a cached copy that disagrees (truncated)
    is downloaded again.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from .checkpoint import read_json
    from .weightsets import repo_files_to_fetch, shard_names

    try:
        listing = hub_client(token).model_info(repo_id, revision=revision, files_metadata=True)
    except (OfflineModeIsEnabled, HubRetriesExhausted, *transport_errors()) as unreachable:
        try:
            cached = snapshot_download(repo_id, revision=revision, token=token, local_files_only=True,
                                       allow_patterns=[], library_name="loratool")  # fmt: skip
        except LocalEntryNotFoundError:
            if isinstance(unreachable, OfflineModeIsEnabled):
                raise
            raise unreachable from None
        if not isinstance(unreachable, OfflineModeIsEnabled):
            hub_note(f"hub: {where}: the Hub cannot be reached ({unreachable}); using the cached snapshot")
        return cached
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
    _redownload_wrong_sizes(repo_id, Path(folder), listing, [*files, *shards], token, where)
    return folder


def _redownload_wrong_sizes(repo_id: str, folder: Path, listing, names: list[str], token: str | None,
                            where: str) -> None:  # fmt: skip
    """Download again each cached file whose size is not the one the Hub lists (a truncated or damaged copy)."""
    from huggingface_hub import hf_hub_download

    sizes = {sibling.rfilename: sibling.size for sibling in listing.siblings or [] if sibling.size is not None}
    for name in names:
        path = folder / name
        if name not in sizes or not path.exists() or path.stat().st_size == sizes[name]:
            continue
        hub_note(f"hub: {where}: the cached {name} is {path.stat().st_size} bytes, the Hub lists {sizes[name]}; "
                 "downloading it again")  # fmt: skip
        hf_hub_download(repo_id, name, revision=folder.name, token=token, force_download=True,
                        library_name="loratool")  # fmt: skip
        if path.stat().st_size != sizes[name]:
            raise HubError(f"{where}: {name}: downloaded {path.stat().st_size} bytes but the Hub lists "
                           f"{sizes[name]}; try again later")  # fmt: skip


def _exactly(names: list[str]) -> list[str]:
    """allow_patterns matching exactly these repo paths (fnmatch's special characters escaped)."""
    import glob

    return [glob.escape(name) for name in names]
