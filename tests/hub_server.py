"""A loopback server speaking the Hugging Face Hub's HTTP API, for driving the real client in tests.

Standard library only. It keeps repos in memory (branches → commits → files,
LFS objects by sha256) and implements what `huggingface_hub` calls for:
repo create, validate-yaml, preupload, LFS batch + PUT, commit (with create_pr),
branch create, repo info, tree, and resolve (HEAD/GET). Requests need a bearer
token matching `token` for writes and for private repos; repos named in
`forbidden` answer 403 (`gated` 403 GatedRepo), and namespaces in `missing_namespaces` 404 on create. Every request is logged in `requests` (headers included)
so tests can assert what the client sent. `faults` makes it misbehave as the Hub does at times (see `Faults`);
`missing_files` are listed by repo info but answer 404 when fetched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    pull_requests: list[str] = field(default_factory=list)


@dataclass
class Faults:
    """Failures to inject; each counter is used up as it fires, sets fire every time until emptied."""

    first_request_status: int | None = None  # the first request for each (method, path) gets this status
    repo_info_429: int = 0  # repo-info requests answered 429 with `Retry-After: retry_after`
    retry_after: str = "1"
    cut_downloads: set[str] = field(default_factory=set)  # files whose next GET body stops half-way
    commit_500: int = 0  # commit calls answered 500 (nothing committed)
    commit_answers_lost: int = 0  # commit calls applied, then the connection closed without an answer
    cut_uploads: int = 0  # LFS PUTs whose connection is closed after half the body
    fail_uploads: set[str] = field(default_factory=set)  # LFS oids whose PUT answers 500 every time
    everything: int | None = None  # every request answered this status (a Hub that is down)
    seen: set[tuple[str, str]] = field(default_factory=set)


class FakeHub:
    """The server's state and lifecycle: `with FakeHub(token) as hub: hub.url ...`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.faults = Faults()
        self.missing_files: set[str] = set()
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.forbidden: set[str] = set()
        self.gated: set[str] = set()
        self.missing_namespaces: set[str] = set()
        self.requests: list[tuple[str, str, dict]] = []
        self.times: list[float] = []  # time.monotonic() of each request, in step with `requests`
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            state = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def add_files(self, repo_id: str, files: dict[str, bytes], private: bool = False, branch: str = "main") -> str:
        """Seed a repo directly (for download tests)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private))
            return self._commit(repo, branch, dict(files), "seed")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches.get(revision, revision)]

    def _commit(self, repo: Repo, branch: str, changes: dict[str, bytes], message: str) -> str:
        parent = repo.commits.get(repo.branches.get(branch, ""), {})
        tree = {**parent, **changes}
        sha = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items())).encode()
            + message.encode()
            + str(len(repo.commits)).encode()
        ).hexdigest()
        repo.commits[sha] = tree
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha


def _is_lfs(path: str, content: bytes) -> bool:
    return path.endswith((".safetensors", ".bin")) or len(content) > 1_000_000


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _file_entry(name: str, content: bytes) -> dict:
    """What the Hub says of a file with its metadata: size, git blob id, and LFS sha256 for LFS files."""
    entry = {"size": len(content), "oid": _git_blob_id(content)}
    if _is_lfs(name, content):
        entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "sha256": hashlib.sha256(content).hexdigest(),
                        "size": len(content), "pointerSize": 130}  # fmt: skip
    return entry


class _Handler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        content_type = "application/json" if body is None else "application/octet-stream"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.state.token}"

    def _repo(self, repo_id: str, write: bool = False) -> Repo | None:
        """The repo, or None after answering 401/403/404 as the Hub does."""
        if repo_id in self.state.forbidden:
            self._error(403, "", f"You don't have the rights to access {repo_id}")
            return None
        if repo_id in self.state.gated:
            self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted")
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if write and not self._authorized():
            self._error(401, "", "Invalid credentials in Authorization header")
            return None
        return repo

    def _route(self, method: str) -> None:
        parsed = urlparse(self.path)
        path, query = unquote(parsed.path), parse_qs(parsed.query)
        with self.state.lock:
            self.state.requests.append((method, self.path, dict(self.headers)))
            self.state.times.append(time.monotonic())
            if self._injected_fault(method, path):
                return None
        for pattern, handler in self.ROUTES.get(method, ()):
            match = re.fullmatch(pattern, path)
            if match:
                with self.state.lock:
                    return handler(self, query=query, **match.groupdict())
        self._error(404, "", f"no fake-hub route for {method} {path}")

    def _injected_fault(self, method: str, path: str) -> bool:
        """Answer with an injected failure instead of the endpoint; True when one fired."""
        faults = self.state.faults
        if faults.everything is not None:
            return self._fail(faults.everything)
        if faults.first_request_status is not None and (method, path) not in faults.seen:
            faults.seen.add((method, path))
            return self._fail(faults.first_request_status)
        if method == "GET" and faults.repo_info_429 and re.fullmatch(rf"/api/models/{REPO}(/revision/{REV})?", path):
            faults.repo_info_429 -= 1
            return self._fail(429, {"Retry-After": faults.retry_after})
        if method == "POST" and faults.commit_500 and re.fullmatch(rf"/api/models/{REPO}/commit/{REV}", path):
            faults.commit_500 -= 1
            return self._fail(500)
        if method == "PUT" and path.startswith("/lfs-upload/"):
            if path.rsplit("/", 1)[1] in faults.fail_uploads:
                return self._fail(500)
            if faults.cut_uploads:
                faults.cut_uploads -= 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
                self.close_connection = True  # no answer: the connection just ends
                return True
        return False

    def _fail(self, status: int, headers: dict | None = None) -> bool:
        self._body()
        self._send(status, {"error": f"injected HTTP {status}"}, headers)
        return True

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # --- endpoints ------------------------------------------------------------------------

    def create_repo(self, query) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._authorized():
            return self._error(401, "", "Invalid credentials in Authorization header")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.state.forbidden:
            return self._error(403, "", f"You don't have the rights to create {repo_id}")
        if repo_id.split("/")[0] in self.state.missing_namespaces:
            return self._error(404, "RepoNotFound", f"Namespace {repo_id.split('/')[0]} not found")
        if repo_id in self.state.repos:
            message = "You already created this model repo"
            return self._send(
                409, {"error": message, "url": f"{self.state.url}/{repo_id}"}, {"X-Error-Message": message}
            )
        self.state.repos[repo_id] = Repo(bool(body.get("private")) or body.get("visibility") == "private")
        self.state._commit(
            self.state.repos[repo_id], "main", {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit"
        )
        self._send(200, {"url": f"{self.state.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self, query) -> None:
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def _revision(self, repo: str, rev: str) -> tuple[Repo, str] | None:
        """The repo and the commit a branch or sha names, or None after answering 40x."""
        found = self._repo(repo)
        if found is None:
            return None
        sha = found.branches.get(rev, rev if rev in found.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return found, sha

    def repo_info(self, query, repo, rev="main") -> None:
        resolved = self._revision(repo, rev)
        if resolved is None:
            return
        found, sha = resolved
        files = found.commits[sha]
        siblings = [{"rfilename": name} for name in sorted(files)]
        if query.get("blobs") in (["true"], ["True"], ["1"]):
            for sibling in siblings:
                entry = _file_entry(sibling["rfilename"], files[sibling["rfilename"]])
                sibling.update(
                    size=entry["size"], blobId=entry["oid"], **({"lfs": entry["lfs"]} if "lfs" in entry else {})
                )
        self._send(200, {"id": repo, "modelId": repo, "sha": sha, "private": found.private, "siblings": siblings})

    def tree(self, query, repo, rev, subpath="") -> None:
        resolved = self._revision(repo, rev)
        if resolved is None:
            return
        found, sha = resolved
        entries = []
        for name, content in sorted(found.commits[sha].items()):
            entries.append({"type": "file", "path": name, **_file_entry(name, content)})
        self._send(200, entries)

    def resolve(self, query, repo, rev, filename) -> None:
        resolved = self._revision(repo, rev)
        if resolved is None:
            return
        found, sha = resolved
        content = found.commits[sha].get(filename)
        if content is None or filename in self.state.missing_files:
            return self._error(404, "EntryNotFound", f"{filename} does not exist")
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_id(content)}"'}
        if _is_lfs(filename, content):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(content).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(content))
        start = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if start and self.command == "GET":
            offset = int(start.group(1))
            headers["Content-Range"] = f"bytes {offset}-{len(content) - 1}/{len(content)}"
            return self._send(206, headers=headers, body=content[offset:])
        if self.command == "GET" and filename in self.state.faults.cut_downloads:
            self.state.faults.cut_downloads.discard(filename)
            return self._send_cut(headers, content)
        self._send(200, headers=headers, body=content)

    def _send_cut(self, headers: dict, content: bytes) -> None:
        """Announce the whole body, send half of it, and end the connection."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(content[: len(content) // 2])
        self.wfile.flush()
        self.close_connection = True

    def preupload(self, query, repo, rev) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return
        body = json.loads(self._body())
        files = []
        for item in body.get("files", []):
            sample = base64.b64decode(item.get("sample", ""))
            lfs = item["path"].endswith((".safetensors", ".bin")) or item.get("size", 0) > 1_000_000 or b"\0" in sample
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._send(200, {"files": files, "commitOid": found.branches.get(rev)})

    def lfs_batch(self, query, repo) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return
        body = json.loads(self._body())
        objects = []
        for item in body.get("objects", []):
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.state.url}/lfs-upload/{item['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, query, oid) -> None:
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "", "sha256 mismatch")
        self.state.lfs[oid] = content
        self._send(200, {})

    def commit(self, query, repo, rev) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        changes = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                changes[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.state.lfs:
                    return self._error(422, "", f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = self.state.lfs[value["oid"]]
        parent = header.get("parentCommit")
        if parent and query.get("create_pr") is None and parent != found.branches.get(rev):
            return self._error(412, "", "A commit has happened since. Please refresh and try again.")
        branch = rev
        pr_url = None
        if query.get("create_pr") in (["1"], ["true"], ["True"]):
            number = len(found.pull_requests) + 1
            branch = f"refs/pr/{number}"
            found.branches[branch] = found.branches.get(rev, "")
            found.pull_requests.append(branch)
            pr_url = f"{self.state.url}/{repo}/discussions/{number}"
        elif rev not in found.branches:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        sha = self.state._commit(found, branch, changes, header.get("summary", ""))
        if self.state.faults.commit_answers_lost:
            self.state.faults.commit_answers_lost -= 1
            self.close_connection = True  # committed, but the client never hears of it
            return None
        self._send(200, {"commitUrl": f"{self.state.url}/{repo}/commit/{sha}", "commitOid": sha,
                         "commitMessage": header.get("summary", ""), "pullRequestUrl": pr_url})  # fmt: skip

    def create_branch(self, query, repo, branch) -> None:
        found = self._repo(repo, write=True)
        if found is None:
            return
        self._body()
        if branch in found.branches:
            return self._error(409, "", f"branch {branch} already exists")
        found.branches[branch] = found.branches["main"]
        self._send(200, {})

    ROUTES = {
        "POST": [
            (r"/api/repos/create", create_repo),
            (r"/api/validate-yaml", validate_yaml),
            (rf"/api/models/{REPO}/preupload/{REV}", preupload),
            (rf"/{REPO}\.git/info/lfs/objects/batch", lfs_batch),
            (rf"/api/models/{REPO}/commit/{REV}", commit),
            (rf"/api/models/{REPO}/branch/(?P<branch>.+)", create_branch),
        ],
        "PUT": [(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", lfs_upload)],
        "GET": [
            (rf"/api/models/{REPO}/revision/{REV}", repo_info),
            (rf"/api/models/{REPO}", repo_info),
            (rf"/api/models/{REPO}/tree/{REV}(?:/(?P<subpath>.*))?", tree),
            (rf"/{REPO}/resolve/{REV}/(?P<filename>.+)", resolve),
        ],
        "HEAD": [(rf"/{REPO}/resolve/{REV}/(?P<filename>.+)", resolve)],
    }
