"""The fake Hub's data: blobs, commits, repositories, tokens, request records, injected faults, HTTP errors."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
