"""A local fake of the Hugging Face Hub HTTP API, for tests that run the real client over real HTTP.

It implements the endpoints that ``huggingface_hub`` (and ``datasets`` through it) call to read,
download and commit to a repository, and nothing else:

- repositories of every type (model, dataset, space) with branches, each branch a linear history
  of commits; a commit holds the full file map ``path -> Blob``; its sha is the sha1 of its parent,
  message and content, so identical inputs give identical shas;
- ``GET /api/{type}s/{id}[/revision/{rev}]``, ``/refs``, ``/tree/{rev}[/{path}]`` (recursive,
  paginated with a ``Link`` header), ``/commits/{rev}``, ``POST /paths-info/{rev}``;
- ``HEAD``/``GET /[{type}s/]{id}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (git blob
  sha1 for regular files, sha256 for LFS files), ``Content-Length`` and ``Range``;
- ``POST /api/repos/create`` (409 with the url when the repo exists), ``DELETE /api/repos/delete``,
  ``POST /api/validate-yaml``, ``GET /api/whoami-v2`` (user, ``orgs`` with ``roleInOrg``, and
  ``auth.accessToken`` with the token's ``role`` and, for a fine-grained token, its ``fineGrained``
  scopes), ``GET /api/{type}s/{id}/auth-check[/write]`` (404, 403 or 200);
- ``POST /api/{type}s/{id}/preupload/{rev}`` (``lfs`` for ``*.parquet``, binary or large files),
  the git-lfs batch endpoint ``POST /[{type}s/]{id}.git/info/lfs/objects/batch`` handing out upload
  and verify hrefs on this server, ``PUT`` to store an object (its sha256 and size are checked);
- ``POST /api/{type}s/{id}/commit/{branch}``: ndjson ``header`` (``parentCommit`` -> 412 when the
  branch head differs), ``file``, ``lfsFile``, ``deletedFile`` and ``deletedFolder`` lines, applied
  all together or not at all;
- ``POST``/``DELETE /api/{type}s/{id}/branch/{branch}``.

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
``X-Error-Message`` headers and a JSON ``{"error": ...}`` body, as the client expects.

Auth: a server started with ``token=...`` (a write token of ``user``) requires ``Authorization:
Bearer <token>`` on every write and on reads of private repositories (401 otherwise); a wrong or
revoked token is refused everywhere (401). :meth:`FakeHub.add_token` issues more tokens: role
``read`` (reads only), ``write``, or ``fineGrained`` with scoped permissions (``repo.write`` on a
user, an org or one repository). A valid token without the right to write answers 403, as does
writing outside the user's namespace and the ``orgs`` it may write to. Tokens are kept in memory
only: the request log stores ``auth`` ("none", "valid", "invalid") and masks the header value, and
nothing is written to disk.

Test hooks: :meth:`FakeHub.fail_next` (drop the connection before or after handling a request,
answer an error status, or never answer), :meth:`FakeHub.add_token`, :meth:`FakeHub.revoke_token`,
:meth:`FakeHub.commit` (another writer moves a branch), :meth:`FakeHub.set_branch`,
:meth:`FakeHub.head`, :meth:`FakeHub.files`, :meth:`FakeHub.history`, :attr:`FakeHub.requests`.
The :func:`fake_hub` fixture starts one on 127.0.0.1 and points ``huggingface_hub`` and
``datasets`` at it. Test modules import it (``from .fakehub import
fake_hub_fixture``; the fixture's name is ``fake_hub``) rather than getting it from conftest.

Standard library only (``http.server``); the fixture imports pytest and the clients it configures.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

GITATTRIBUTES = (
    b"*.arrow filter=lfs diff=lfs merge=lfs -text\n"
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.zip filter=lfs diff=lfs merge=lfs -text\n"
)
LFS_SUFFIXES = (".arrow", ".bin", ".parquet", ".safetensors", ".zip", ".npy", ".pt", ".gz")
TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
STALE_PARENT = "A commit has happened since. Please refresh and try again."
INVALID_TOKEN = "Invalid credentials in Authorization header"
HANG_LIMIT_S = 30.0  # how long a "hang" fault holds a request at most


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_date(ts: float | None = None) -> str:
    """A timestamp formatted like the Hub's (``2024-01-01T00:00:00.000Z``)."""
    dt = datetime.fromtimestamp(time.time() if ts is None else ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Blob:
    """File content as the Hub stores it: in git (``lfs=False``) or as an LFS object."""

    data: bytes
    lfs: bool
    git_sha: str = field(init=False)
    sha256: str = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "git_sha", git_blob_sha1(self.data))
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git oid the tree shows: the blob's, or the LFS pointer's."""
        return git_blob_sha1(self.pointer) if self.lfs else self.git_sha

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        rev = rev.removeprefix("refs/heads/")
        if rev in self.branches:
            return self.commits[self.branches[rev]]
        if rev in self.commits:
            return self.commits[rev]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [c for sha, c in self.commits.items() if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        return None

    def history(self, branch: str) -> list[Commit]:
        out = []
        sha = self.branches.get(branch)
        while sha is not None:
            out.append(self.commits[sha])
            sha = self.commits[sha].parent
        return out


@dataclass
class RequestRecord:
    """One request as the server saw it (the Authorization value is masked)."""

    method: str
    path: str
    headers: dict[str, str]
    body_size: int
    auth: str
    status: int | str | None = None


@dataclass(frozen=True)
class TokenInfo:
    """What the fake knows of a token: its name, role and, for a fine-grained one, ``(entity type, name,
    permissions)`` scopes such as ``("user", "tester", ("repo.write",))``."""

    name: str
    role: str
    scoped: tuple[tuple[str, str, tuple[str, ...]], ...] = ()


ORG_WRITE_ROLES = ("admin", "write", "contributor")


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    mode: str
    status: int
    message: str
    remaining: int


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class _Dropped(Exception):
    """The handler closes the connection without answering."""


class FakeHub:
    """An in-memory Hub served over HTTP on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        token: str | None = None,
        *,
        user: str = "tester",
        orgs: dict[str, str] | None = None,
        lfs_threshold: int = 10 * 1024 * 1024,
        tree_page_size: int = 1000,
        gitattributes: bool = True,
    ):
        self.token = token
        self.user = user
        self.orgs = dict(orgs or {})  # organisation -> the user's roleInOrg
        self.tokens: dict[str, TokenInfo] = {token: TokenInfo("fake-write", "write")} if token else {}
        self._release = threading.Event()  # set by stop(): ends the requests a "hang" fault holds
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.gitattributes = gitattributes
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._upload_keys: dict[str, tuple[tuple[str, str], str, int]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self.home: Path | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._release.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------- test hooks
    def fail_next(
        self,
        method: str,
        path_regex: str,
        mode: str = "drop",
        *,
        status: int = 503,
        message: str = "injected failure",
        times: int = 1,
    ):
        """Make the next ``times`` requests matching ``method`` (or ``*``) and ``path_regex`` fail.

        ``mode``: ``drop`` closes the connection after reading part of the request, before it has any
        effect; ``drop_after`` handles the request (a commit lands) and closes the connection instead
        of answering; ``status`` answers ``status`` with ``message`` as the error and no effect;
        ``hang`` reads the request and does not answer (the connection stays open, without effect, until
        the client gives up, the server stops or :data:`HANG_LIMIT_S` pass: a client without a timeout
        fails a test's time bound rather than hanging the test run). The regex is searched in the raw request path (query
        string excluded).
        """
        if mode not in ("drop", "drop_after", "status", "hang"):
            raise ValueError(f"unknown fault mode {mode!r}; use drop, drop_after, status or hang")
        with self._lock:
            self._faults.append(Fault(method.upper(), re.compile(path_regex), mode, status, message, times))

    def add_token(self, role: str = "read", *, scoped=(), name: str | None = None) -> str:
        """Issue a token of ``user``: role ``read``, ``write`` or ``fineGrained`` (then ``scoped``, see
        :class:`TokenInfo`); returns its value."""
        if role not in ("read", "write", "fineGrained"):
            raise ValueError(f"unknown token role {role!r}; use read, write or fineGrained")
        value = "hf_" + secrets.token_hex(17)
        scopes = tuple((kind, entity, tuple(perms)) for kind, entity, perms in scoped)
        with self._lock:
            self.tokens[value] = TokenInfo(name or f"fake-{role}", role, scopes)
        return value

    def revoke_token(self, token: str) -> None:
        """From now on ``token`` is refused like a wrong one (401)."""
        with self._lock:
            self.tokens.pop(token, None)

    def write_refusal(self, info: TokenInfo | None, repo_type: str, repo_id: str, *, create: bool = False) -> str | None:
        """Why the token ``info`` may not write to (or, with ``create``, create) the repository; None if it may."""
        if self.token is None:  # an open server
            return None
        namespace = repo_id.split("/")[0]
        if info is None or info.role == "read":
            return "This token has the read role: it cannot write; use a token with write access"
        if namespace != self.user and self.orgs.get(namespace) not in ORG_WRITE_ROLES:
            return f"You don't have the rights to write to {repo_id}: {namespace} is not {self.user} nor an org it writes to"
        if info.role == "fineGrained":
            entities = {("user" if namespace == self.user else "org", namespace)}
            if not create:
                entities.add((repo_type, repo_id))
            if not any((kind, entity) in entities and "repo.write" in perms for kind, entity, perms in info.scoped):
                return f"This fine-grained token has no repo.write permission on {namespace} or on {repo_id}"
        return None

    def create_repo(self, repo_id: str, *, repo_type: str = "dataset", private: bool = False) -> Repo:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                raise ValueError(f"{repo_type} repo {repo_id} exists")
            repo = Repo(repo_type, repo_id, private, hub_date())
            files = {".gitattributes": Blob(GITATTRIBUTES, lfs=False)} if self.gitattributes else {}
            commit = self._new_commit(None, "initial commit", "", files)
            repo.commits[commit.sha] = commit
            repo.branches["main"] = commit.sha
            self.repos[key] = repo
            return repo

    def commit(
        self,
        repo_id: str,
        add: dict[str, bytes] | None = None,
        delete: list[str] | tuple[str, ...] = (),
        *,
        branch: str = "main",
        message: str = "commit by another writer",
        repo_type: str = "dataset",
    ) -> str:
        """Commit directly (another writer): add/overwrite and delete files on ``branch``; returns the sha."""
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            head = repo.commits[repo.branches[branch]]
            files = dict(head.files)
            for path in delete:
                if files.pop(path, None) is None:
                    raise KeyError(f"{path} is not in {repo_id}@{branch}")
            for path, data in (add or {}).items():
                files[path] = Blob(data, lfs=self._is_lfs(path, len(data), data[:512]))
            commit = self._new_commit(head.sha, message, "", files)
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            return commit.sha

    def set_branch(self, repo_id: str, branch: str, sha: str, *, repo_type: str = "dataset") -> None:
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if sha not in repo.commits:
                raise KeyError(f"no commit {sha} in {repo_id}")
            repo.branches[branch] = sha

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "dataset") -> str | None:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            return None if repo is None else repo.branches.get(branch)

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset") -> dict[str, bytes]:
        with self._lock:
            commit = self._repo(repo_type, repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision} in {repo_id}")
            return {path: blob.data for path, blob in commit.files.items()}

    def blobs(self, repo_id: str, revision: str = "main", *, repo_type: str = "dataset") -> dict[str, Blob]:
        with self._lock:
            commit = self._repo(repo_type, repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision} in {repo_id}")
            return dict(commit.files)

    def history(self, repo_id: str, branch: str = "main", *, repo_type: str = "dataset") -> list[Commit]:
        """Commits of ``branch``, newest first."""
        with self._lock:
            return self._repo(repo_type, repo_id).history(branch)

    def requests_matching(self, method: str, path_regex: str) -> list[RequestRecord]:
        pattern = re.compile(path_regex)
        with self._lock:
            return [r for r in self.requests if r.method == method.upper() and pattern.search(r.path)]

    # ----------------------------------------------------------------- internals
    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id}")
        return repo

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return path.endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in sample

    @staticmethod
    def _new_commit(parent: str | None, title: str, message: str, files: dict[str, Blob]) -> Commit:
        h = hashlib.sha1()
        h.update(f"parent {parent}\n{title}\n{message}\n".encode())
        for path in sorted(files):
            h.update(f"{path}\0{files[path].git_sha}\0{int(files[path].lfs)}\n".encode())
        return Commit(h.hexdigest(), parent, title, message, hub_date(), dict(files))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in (method, "*") and fault.pattern.search(path):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    return path


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the :class:`FakeHub` it belongs to (set as a class attribute)."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    API_REPO = re.compile(r"^/api/(models|datasets|spaces)/([^/]+)/([^/]+)(?:/(.*))?$")
    RESOLVE = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")
    LFS_BATCH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+)/([^/]+?)\.git/info/lfs/objects/batch$")

    # ---------------------------------------------------------------- plumbing
    def setup(self):
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.hub._lock:
                self.hub._connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - keep the server quiet (and the token off stderr)
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(length, limit))

    def _auth_state(self) -> str:
        """"none", "valid" or "invalid"; a valid token's :class:`TokenInfo` goes to ``self._token``."""
        self._token = None
        value = self.headers.get("Authorization")
        if not value:
            return "none"
        if self.hub.token is None:
            return "valid"
        with self.hub._lock:
            self._token = self.hub.tokens.get(value.removeprefix("Bearer "))
        return "valid" if value.startswith("Bearer ") and self._token is not None else "invalid"

    def _dispatch(self, method: str):
        raw = urlsplit(self.path)
        path, query = raw.path, parse_qs(raw.query)
        auth = self._auth_state()
        headers = {k: ("<masked>" if k.lower() == "authorization" else v) for k, v in self.headers.items()}
        record = RequestRecord(method, self.path, headers, int(self.headers.get("Content-Length") or 0), auth)
        self._record = record
        with self.hub._lock:
            self.hub.requests.append(record)
        fault = self.hub._take_fault(method, path)
        if fault is not None and fault.mode == "drop":
            half = int(self.headers.get("Content-Length") or 0) // 2
            if half:
                self.rfile.read(half)
            record.status = "dropped"
            self._drop()
            return
        body = b"" if method in ("GET", "HEAD") else self._read_body()
        record.body_size = len(body)
        if fault is not None and fault.mode == "hang":
            record.status = "hung"
            self.hub._release.wait(HANG_LIMIT_S)
            self._drop()
            return
        if fault is not None and fault.mode == "status":
            record.status = fault.status
            headers = {"X-Error-Message": fault.message}
            self._send_json({"error": fault.message}, fault.status, headers, head_only=method == "HEAD")
            return
        if fault is not None and fault.mode == "drop_after":
            real_wfile = self.wfile
            self.wfile = io.BytesIO()
            try:
                self._route(method, path, query, body, auth, record)
            finally:
                self.wfile = real_wfile
            record.status = "dropped after handling"
            self._drop()
            return
        self._route(method, path, query, body, auth, record)

    def _drop(self):
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _route(self, method, path, query, body, auth, record):
        """Handle the request; every answer goes through :meth:`_send`, which records its status."""
        head_only = method == "HEAD"
        try:
            if auth == "invalid":
                raise HubHTTPError(401, INVALID_TOKEN)
            self._handle(method, path, query, body, auth)
        except HubHTTPError as err:
            extra = {"X-Error-Message": err.message}
            if err.code:
                extra["X-Error-Code"] = err.code
            self._send_json({"error": err.message, **err.extra}, err.status, extra, head_only=head_only)
        except (ValueError, KeyError, TypeError) as err:  # a malformed request body (or a bug in the fake)
            self._send_json({"error": f"bad request: {type(err).__name__}: {err}"}, 400, head_only=head_only)
        except Exception as err:  # a bug in the fake: answer 500 with the reason, never hang the client
            self._send_json({"error": f"fake Hub error: {type(err).__name__}: {err}"}, 500, head_only=head_only)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, *, head_only: bool = False):
        self._record.status = status  # before the answer leaves, so a client that got it sees the record complete
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: dict[str, str] | None = None, *, head_only=False):
        self._send(
            status,
            json.dumps(obj).encode(),
            {"Content-Type": "application/json", **(headers or {})},
            head_only=head_only,
        )

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    # ---------------------------------------------------------------- routing
    def _handle(self, method, path, query, body, auth) -> int:
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami(auth)
        if path == "/api/validate-yaml" and method == "POST":
            return self._ok({"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"), auth)
        if path == "/api/repos/delete" and method == "DELETE":
            return self._delete_repo(json.loads(body or b"{}"), auth)
        if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            if method != "PUT":
                raise HubHTTPError(405, "method not allowed")
            return self._lfs_put(m.group(1), query.get("key", [""])[0], body)
        if m := re.fullmatch(r"/lfs-verify/(models|datasets|spaces)/([^/]+)/([^/]+)", path):
            return self._lfs_verify((TYPES[m.group(1)], f"{m.group(2)}/{m.group(3)}"), json.loads(body), auth)
        if m := self.LFS_BATCH.match(path):
            if method != "POST":
                raise HubHTTPError(405, "method not allowed")
            key = (TYPES.get(f"{m.group(1)}") or "model", f"{m.group(2)}/{m.group(3)}")
            return self._lfs_batch(key, json.loads(body), auth)
        if m := self.API_REPO.match(path):
            key = (TYPES[m.group(1)], f"{unquote(m.group(2))}/{unquote(m.group(3))}")
            return self._api(method, key, m.group(4) or "", query, body, auth)
        if m := self.RESOLVE.match(path):
            if method not in ("GET", "HEAD"):
                raise HubHTTPError(405, "method not allowed")
            key = (TYPES.get(f"{m.group(1)}") or "model", f"{unquote(m.group(2))}/{unquote(m.group(3))}")
            return self._resolve(method, key, unquote(m.group(4)), unquote(m.group(5)), auth)
        raise HubHTTPError(404, f"the fake Hub does not implement {method} {path}")

    def _ok(self, obj, headers: dict[str, str] | None = None) -> int:
        self._send_json(obj, 200, headers)
        return 200

    def _require_write(self, auth: str, key: tuple[str, str], *, create: bool = False):
        """401 without a valid token; 403 when it may not write to (or create) the repository ``key``."""
        if self.hub.token is not None and auth != "valid":
            raise HubHTTPError(401, "You must be authenticated to do this; pass a token with write access.")
        refusal = self.hub.write_refusal(self._token, *key, create=create)
        if refusal is not None:
            raise HubHTTPError(403, refusal)

    def _whoami(self, auth: str) -> int:
        hub = self.hub
        if hub.token is not None and auth != "valid":
            raise HubHTTPError(401, "You must be authenticated to do this.")
        orgs = [{"type": "org", "name": name, "roleInOrg": role} for name, role in sorted(hub.orgs.items())]
        out = {"type": "user", "id": hashlib.sha1(hub.user.encode()).hexdigest()[:24], "name": hub.user,
               "fullname": hub.user, "orgs": orgs, "auth": {"type": "access_token"}}
        info = self._token
        if info is not None:
            access = {"displayName": info.name, "role": info.role, "createdAt": hub_date()}
            if info.role == "fineGrained":
                scoped = [{"entity": {"type": kind, "name": name}, "permissions": list(perms)}
                          for kind, name, perms in info.scoped]
                access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": scoped}
            out["auth"]["accessToken"] = access
        return self._ok(out)

    def _read_repo(self, key, auth) -> Repo:
        repo = self.hub.repos.get(key)
        if repo is None:
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if repo.private and self.hub.token is not None and auth != "valid":
            raise HubHTTPError(401, "Repository not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ---------------------------------------------------------------- repo API
    def _api(self, method, key, rest, query, body, auth) -> int:
        with self.hub._lock:
            if rest == "" and method == "GET":
                repo = self._read_repo(key, auth)
                return self._ok(self._info(repo, self._revision(repo, "main"), query))
            parts = rest.split("/", 1)
            action, arg = parts[0], (parts[1] if len(parts) > 1 else "")
            if action == "revision" and method == "GET":
                repo = self._read_repo(key, auth)
                return self._ok(self._info(repo, self._revision(repo, unquote(arg)), query))
            if action == "refs" and method == "GET":
                return self._ok(self._refs(self._read_repo(key, auth)))
            if action == "tree" and method == "GET":
                rev, _, sub = arg.partition("/")
                return self._tree(self._read_repo(key, auth), unquote(rev), unquote(sub), query)
            if action == "paths-info" and method == "POST":
                repo = self._read_repo(key, auth)
                return self._paths_info(repo, self._revision(repo, unquote(arg)), body)
            if action == "auth-check" and method == "GET" and arg in ("", "write"):
                self._read_repo(key, auth)
                if arg == "write":
                    self._require_write(auth, key)
                return self._ok({})
            if action == "commits" and method == "GET":
                return self._commits(self._read_repo(key, auth), unquote(arg), query)
            if action == "preupload" and method == "POST":
                self._require_write(auth, key)
                repo = self._read_repo(key, auth)
                return self._preupload(repo, self._revision(repo, unquote(arg)), json.loads(body))
            if action == "commit" and method == "POST":
                self._require_write(auth, key)
                return self._commit(self._read_repo(key, auth), unquote(arg), body, query)
            if action == "branch" and method in ("POST", "DELETE"):
                self._require_write(auth, key)
                repo = self._read_repo(key, auth)
                if method == "POST":
                    return self._create_branch(repo, unquote(arg), json.loads(body or b"{}"))
                return self._delete_branch(repo, unquote(arg))
        raise HubHTTPError(404, f"the fake Hub does not implement {method} /api/.../{rest}")

    def _info(self, repo: Repo, commit: Commit, query) -> dict:
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            blob = commit.files[path]
            item = {"rfilename": path}
            if blobs:
                item.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    item["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(item)
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    @staticmethod
    def _refs(repo: Repo) -> dict:
        branches = [
            {"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha} for name, sha in sorted(repo.branches.items())
        ]
        return {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    @staticmethod
    def _last_commit(repo: Repo, commit: Commit, path: str) -> dict:
        """The newest commit (from ``commit`` back) that changed ``path`` or a file under it."""

        def view(c: Commit):
            return {p: b.git_sha for p, b in c.files.items() if p == path or p.startswith(path + "/")}

        current = commit
        while current.parent is not None and view(repo.commits[current.parent]) == view(current):
            current = repo.commits[current.parent]
        return {"id": current.sha, "title": current.title, "date": current.date}

    def _entries(self, repo: Repo, commit: Commit, prefix: str, recursive: bool, expand: bool) -> list[dict]:
        base = prefix + "/" if prefix else ""
        files, dirs = {}, set()
        for path, blob in commit.files.items():
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            for depth in range(1, len(rest)):
                if depth == 1 or recursive:
                    dirs.add(base + "/".join(rest[:depth]))
            if len(rest) == 1 or recursive:
                files[path] = blob
        items = []
        for d in sorted(dirs):
            inner = sorted((p, b.oid) for p, b in commit.files.items() if p.startswith(d + "/"))
            item = {"type": "directory", "path": d, "oid": hashlib.sha1(repr(inner).encode()).hexdigest(), "size": 0}
            if expand:
                item["lastCommit"] = self._last_commit(repo, commit, d)
            items.append(item)
        for path in sorted(files):
            blob = files[path]
            item = {"type": "file", "path": path, "size": len(blob.data), "oid": blob.oid}
            if blob.lfs:
                item["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            if expand:
                item["lastCommit"] = self._last_commit(repo, commit, path)
            items.append(item)
        return sorted(items, key=lambda i: i["path"])

    def _tree(self, repo: Repo, rev: str, sub: str, query) -> int:
        commit = self._revision(repo, rev)
        sub = sub.strip("/")
        if sub and sub in commit.files:
            raise HubHTTPError(400, f"{sub} is a file, not a directory")
        if sub and not any(p.startswith(sub + "/") for p in commit.files):
            raise HubHTTPError(404, f"Entry not found: {sub}", "EntryNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        items = self._entries(repo, commit, sub, recursive, expand)
        start = int(query.get("cursor", ["0"])[0])
        size = self.hub.tree_page_size
        page = items[start : start + size]
        headers = {}
        if start + size < len(items):
            nxt = (
                f"{self._base()}/api/{repo.repo_type}s/{repo.repo_id}/tree/{quote(rev, safe='')}"
                + (f"/{quote(sub)}" if sub else "")
                + f"?recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={start + size}"
            )
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self._ok(page, headers)

    def _paths_info(self, repo: Repo, commit: Commit, body: bytes) -> int:
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            data = json.loads(body or b"{}")
            paths, expand = data.get("paths", []), bool(data.get("expand"))
        else:
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                blob = commit.files[p]
                item = {"type": "file", "path": p, "size": len(blob.data), "oid": blob.oid}
                if blob.lfs:
                    item["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            elif any(f.startswith(p + "/") for f in commit.files) or p == "":
                inner = sorted((f, b.oid) for f, b in commit.files.items() if f.startswith(p + "/"))
                item = {"type": "directory", "path": p, "oid": hashlib.sha1(repr(inner).encode()).hexdigest()}
            else:
                continue
            if expand:
                item["lastCommit"] = self._last_commit(repo, commit, p)
            out.append(item)
        return self._ok(out)

    def _commits(self, repo: Repo, rev: str, query) -> int:
        commit = self._revision(repo, rev)
        items = []
        while commit is not None:
            items.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.hub.user}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return self._ok(items)

    def _preupload(self, repo: Repo, commit: Commit, payload: dict) -> int:
        out = []
        for f in payload.get("files", []):
            path = _check_path(f["path"])
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if self.hub._is_lfs(path, int(f.get("size", 0)), sample) else "regular"
            item = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = commit.files.get(path)
            if existing is not None:
                item["oid"] = existing.sha256 if existing.lfs else existing.git_sha
            out.append(item)
        return self._ok({"files": out, "commitOid": commit.sha})

    def _lfs_batch(self, key, payload: dict, auth) -> int:
        self._require_write(auth, key)
        with self.hub._lock:
            repo = self._read_repo(key, auth)
            if payload.get("operation") != "upload":
                raise HubHTTPError(400, "the fake Hub only implements the LFS upload operation")
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if repo.lfs_objects.get(oid) is None:
                    upload_key = secrets.token_hex(16)
                    self.hub._upload_keys[upload_key] = (key, oid, size)
                    verify = f"{self._base()}/lfs-verify/{key[0]}s/{key[1]}"
                    item["actions"] = {
                        "upload": {"href": f"{self._base()}/lfs-upload/{oid}?key={upload_key}"},
                        "verify": {"href": verify, "header": {}},
                    }
                objects.append(item)
        return self._ok({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, oid: str, upload_key: str, body: bytes) -> int:
        with self.hub._lock:
            grant = self.hub._upload_keys.get(upload_key)
            if grant is None or grant[1] != oid:
                raise HubHTTPError(403, "Invalid or expired upload URL")
            key, _, size = grant
            if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
                raise HubHTTPError(400, f"Uploaded content does not match oid {oid} / size {size}")
            self.hub._repo(*key).lfs_objects[oid] = body
        return self._ok({})

    def _lfs_verify(self, key, payload: dict, auth) -> int:
        self._require_write(auth, key)
        with self.hub._lock:
            repo = self._read_repo(key, auth)
            data = repo.lfs_objects.get(payload.get("oid"))
            if data is None or len(data) != int(payload.get("size", -1)):
                raise HubHTTPError(404, f"LFS object {payload.get('oid')} not found")
        return self._ok({})

    def _commit(self, repo: Repo, branch: str, body: bytes, query) -> int:
        if query.get("create_pr", ["0"])[0] not in ("0", "", "false"):
            raise HubHTTPError(400, "the fake Hub does not implement pull requests")
        branch = branch.removeprefix("refs/heads/")
        if branch not in repo.branches:
            if repo.resolve(branch) is not None:
                raise HubHTTPError(400, f"Invalid rev id: {branch} is not a branch")
            raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first ndjson line must be the commit header")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[branch]]
        parent = header.get("parentCommit")
        if parent is not None and not (len(parent) >= 7 and head.sha.startswith(parent)):
            raise HubHTTPError(412, STALE_PARENT)
        files = dict(head.files)
        for line in lines[1:]:
            kind, value = line.get("key"), line.get("value", {})
            path = _check_path(str(value.get("path", "")).rstrip("/") if kind == "deletedFolder" else value.get("path"))
            if kind == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubHTTPError(400, f"unsupported encoding {value.get('encoding')!r}")
                files[path] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif kind == "lfsFile":
                data = repo.lfs_objects.get(value.get("oid"))
                if data is None:
                    raise HubHTTPError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                if "size" in value and int(value["size"]) != len(data):
                    raise HubHTTPError(400, f"LFS object size mismatch for {path}")
                files[path] = Blob(data, lfs=True)
            elif kind == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif kind == "deletedFolder":
                inside = [p for p in files if p.startswith(path + "/")]
                if not inside:
                    raise HubHTTPError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del files[p]
            else:
                raise HubHTTPError(400, f"unknown commit operation {kind!r}")
        commit = self.hub._new_commit(head.sha, header.get("summary", ""), header.get("description", ""), files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        url = f"{self._base()}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        return self._ok(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": url,
                "commitMessage": commit.title,
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> int:
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
        if branch.startswith("refs/") or not branch:
            raise HubHTTPError(400, f"Invalid reference for a branch: {branch}")
        start = self._revision(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        return self._ok({})

    def _delete_branch(self, repo: Repo, branch: str) -> int:
        if branch not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubHTTPError(403, "cannot delete the default branch")
        del repo.branches[branch]
        return self._ok({})

    def _repo_key(self, payload: dict) -> tuple[str, str]:
        name = payload.get("name")
        if not name or not re.fullmatch(r"[\w.-]+", name):
            raise HubHTTPError(400, f"Invalid repo name {name!r}")
        org = payload.get("organization") or self.hub.user
        return (payload.get("type") or "model", f"{org}/{name}")

    def _create_repo(self, payload: dict, auth) -> int:
        key = self._repo_key(payload)
        self._require_write(auth, key, create=True)
        url = f"{self._base()}/{URL_PREFIX[key[0]]}{key[1]}"
        with self.hub._lock:
            if key in self.hub.repos:
                raise HubHTTPError(409, f"You already created this {key[0]} repo", extra={"url": url})
            private = bool(payload.get("private")) or payload.get("visibility") == "private"
            self.hub.create_repo(key[1], repo_type=key[0], private=private)
        return self._ok({"url": url, "name": key[1]})

    def _delete_repo(self, payload: dict, auth) -> int:
        key = self._repo_key(payload)
        self._require_write(auth, key)
        with self.hub._lock:
            if self.hub.repos.pop(key, None) is None:
                raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        return self._ok({})

    # ---------------------------------------------------------------- downloads
    def _resolve(self, method, key, rev, path, auth) -> int:
        with self.hub._lock:
            repo = self._read_repo(key, auth)
            commit = self._revision(repo, rev)
            blob = commit.files.get(path)
        if blob is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound")
        data = blob.data
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            total = len(data)
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubHTTPError(416, f"invalid range {rng!r}")
            if m.group(1) == "":
                start, end = max(total - int(m.group(2)), 0), total - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            if start >= total and total > 0:
                self._send(416, b"", {"Content-Range": f"bytes */{total}"}, head_only=method == "HEAD")
                return 416
            data = data[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
            status = 206
        self._send(status, data, headers, head_only=method == "HEAD")
        return status


# --------------------------------------------------------------------------- pytest fixture
def point_clients_at(monkeypatch, hub: FakeHub, home: Path) -> None:
    """Point ``huggingface_hub`` and ``datasets`` at ``hub``, with caches under ``home``.

    Both libraries read several settings once, at import: the environment variables alone are not
    enough, so the module-level constants are patched too (``monkeypatch`` restores everything).
    """
    import datasets.config as dconfig
    from huggingface_hub import HfFileSystem, constants

    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if hub.token:
        monkeypatch.setenv("HF_TOKEN", hub.token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)

    for name, value in {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_XET_CACHE": str(home / "xet"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)

    for name, value in {
        "HF_ENDPOINT": hub.url,
        "HUB_DATASETS_URL": hub.url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False,
        "HF_DATASETS_OFFLINE": False,
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
        "USE_PARQUET_EXPORT": False,  # no dataset-viewer server to ask
        "HF_CACHE_HOME": str(home),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": home / "datasets" / "downloads",
        "EXTRACTED_DATASETS_PATH": home / "datasets" / "downloads" / "extracted",
    }.items():
        if hasattr(dconfig, name):
            monkeypatch.setattr(dconfig, name, value)
    HfFileSystem.clear_instance_cache()


def _close_client_connections() -> None:
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils._http import close_session

    close_session()
    HfFileSystem.clear_instance_cache()


try:
    import pytest
except ImportError:  # the fake itself needs only the standard library
    pytest = None

if pytest is not None:

    @pytest.fixture(name="fake_hub")
    def fake_hub_fixture(tmp_path_factory, monkeypatch):
        """A running :class:`FakeHub` (token-protected; ``HF_TOKEN`` set to its token) the clients point at."""
        hub = FakeHub(token="hf_fake" + secrets.token_hex(16)).start()
        hub.home = tmp_path_factory.mktemp("hf-home")  # HF_HOME of the clients, for tests to inspect
        try:
            point_clients_at(monkeypatch, hub, hub.home)
            yield hub
        finally:
            hub.stop()
            _close_client_connections()
