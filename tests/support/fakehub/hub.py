"""The fake Hub itself: its repositories and tokens in memory, its HTTP server's lifecycle, and the test hooks."""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from .request_handler import RequestHandler
from .state import (
    GITATTRIBUTES,
    LFS_SUFFIXES,
    ORG_WRITE_ROLES,
    Blob,
    Commit,
    Fault,
    Repo,
    RequestRecord,
    TokenInfo,
    hub_date,
)


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

        class Handler(RequestHandler):
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

