"""The repository endpoints: repo info, refs, tree, paths-info, commits, preupload, LFS, commit, branches, create
and delete, resolve (downloads)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from urllib.parse import parse_qs, quote, unquote

from .state import (
    STALE_PARENT,
    URL_PREFIX,
    Blob,
    Commit,
    HubHTTPError,
    Repo,
)


def _check_path(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise HubHTTPError(400, f"Invalid path in repo: {path!r}")
    return path


class RepoRoutes:
    """The repository endpoints of :class:`RequestHandler` (a mixin: ``self`` is the handler serving a request)."""

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

