"""The HTTP side of the fake Hub: connections, auth, faults, dispatch and the answers; the repository endpoints
are :class:`RepoRoutes`."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .repo_routes import RepoRoutes
from .state import (
    HANG_LIMIT_S,
    INVALID_TOKEN,
    TYPES,
    Commit,
    HubHTTPError,
    Repo,
    RequestRecord,
    hub_date,
)


class RequestHandler(RepoRoutes, BaseHTTPRequestHandler):
    """Routes requests to the :class:`FakeHub` it belongs to (set as the class attribute ``hub`` by ``FakeHub.start``)."""

    hub: Any  # the FakeHub
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

