"""The Hugging Face Hub as a remote (``output.hf_repo_id``), through ``huggingface_hub``.

:class:`HubRemote` implements the remote protocol of :mod:`qk_sniffer.remote.base` on a dataset
repository: ``head`` is the branch's commit sha, ``download`` materialises a commit with
``snapshot_download``, ``commit`` uploads files as one ``create_commit`` guarded by
``parent_commit``, so a commit lands only if the branch still points at the pulled revision (the
Hub answers 412 otherwise, raised here as :class:`~qk_sniffer.remote.base.RemoteMovedError`).
Nothing is ever deleted on the remote.

- The endpoint is ``HF_ENDPOINT`` when set (as for the client itself), else the client's default.
- The token is :func:`~qk_sniffer.remote.credentials.hub_token` (``HF_TOKEN`` from the
  environment, then ``.env``, else a login stored by ``hf auth login``). It is passed explicitly to
  the client. Every exception raised from here has the token masked.
- Network time is bounded and failures retried as :mod:`qk_sniffer.remote.hub_http` describes;
  what is left is reported on one line naming the repository, the endpoint and what to do.
- HTTP 401/403 (an invalid, expired or read-only token) and a model or space repository named by
  ``output.hf_repo_id`` are reported on one line naming the config field and the fix, with nothing
  changed on either side.
- Uploads: with ``hf_xet`` installed (a dependency of ``huggingface_hub``), the client sends
  LFS-mode files (every ``*.parquet``) through Xet storage, which deduplicates chunks between
  versions; ``HF_HUB_DISABLE_XET=1`` selects the plain git-lfs upload path (the test Hub speaks
  only that one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from .base import RemoteError, RemoteMovedError
from .credentials import TOKENS_URL, hub_token, redact, require_hub_token
from .hub_http import (
    RETRIES_VAR,
    TIMEOUT_VAR,
    Failure,
    HubError,
    RetryPolicy,
    bound_http,
    call_with_retries,
    error_chain,
    http_status,
    http_timeout,
    public_endpoint,
    retry_policy,
    timeout_errors,
)

log = logging.getLogger("qk_sniffer")

T = TypeVar("T")
REPO_TYPE = "dataset"
_BUF = 8 << 20


class RepoTypeError(HubError):
    """``output.hf_repo_id`` names a model or space repository (and no dataset of that name exists)."""


def file_hashes(path: Path) -> tuple[str, str]:
    """(git blob sha1, sha256) of a file, in one pass: the two ways the Hub identifies content."""
    size = Path(path).stat().st_size
    git = hashlib.sha1(b"blob %d\0" % size)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BUF):
            git.update(block)
            sha.update(block)
    return git.hexdigest(), sha.hexdigest()


def _check_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\\" in rel:
        raise ValueError(f"repository path {rel!r} must be relative, with '/' separators and no '..'")
    return p.as_posix()


class HubRemote:
    """A dataset repository on the Hub as a remote (see the module docstring).

    ``cfg`` supplies ``output.hf_repo_id``, ``output.hf_branch`` (default ``main``) and
    ``output.private`` (used when the first push creates the repository). ``token``, ``endpoint``
    and ``retry`` override the environment and :func:`retry_policy`; ``sleep`` is for tests.
    Constructing one applies :func:`http_timeout` through :func:`bound_http`.
    """

    def __init__(
        self,
        cfg: dict,
        *,
        token: str | None = None,
        endpoint: str | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        from huggingface_hub import HfApi, constants

        out = cfg["output"]
        repo_id = out.get("hf_repo_id")
        if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise RemoteError(f"output.hf_repo_id: {repo_id!r} is not a dataset repository id; use '<user or org>/<name>'")
        self.repo_id = repo_id
        self.branch = out.get("hf_branch") or "main"
        self.private = bool(out.get("private", False))
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        self.token = token if token is not None else hub_token()
        self.retry = retry or retry_policy()
        self.timeout = http_timeout()
        bound_http(self.timeout)
        self._sleep = sleep
        self._api = HfApi(endpoint=self.endpoint, token=self.token, library_name="qk-sniffer")

    # ------------------------------------------------------------------ protocol
    def describe(self) -> str:
        return f"hf dataset {self.repo_id}@{self.branch} at {public_endpoint(self.endpoint)}"

    def head(self) -> str | None:
        """The sha the branch points at; None when the repository (or the branch) does not exist."""
        branches = self.branches()
        return None if branches is None else branches.get(self.branch)

    def branches(self) -> dict[str, str] | None:
        """Branch name -> sha; None when the dataset repository does not exist.

        Then a model or space of that name raises :class:`RepoTypeError`: ``output.hf_repo_id``
        names it by mistake far more likely than it asks for a dataset beside it.
        """
        from huggingface_hub.errors import RepositoryNotFoundError

        def refs():
            try:
                return self._api.list_repo_refs(self.repo_id, repo_type=REPO_TYPE)
            except RepositoryNotFoundError:
                return None

        found = self._call("read the branches of", refs)
        if found is None:
            for kind in ("model", "space"):
                if self._call(f"look for a {kind} named", lambda k=kind: self._api.repo_exists(self.repo_id, repo_type=k)):
                    raise RepoTypeError(
                        f"output.hf_repo_id: {self.repo_id} is a {kind} repository at {public_endpoint(self.endpoint)}, "
                        "not a dataset; set output.hf_repo_id to a dataset repository (a name no model or space uses; "
                        "the first push creates it); nothing was pulled or pushed"
                    )
            log.info("%s does not exist (or is private and no token with access is set)", self.describe())
            return None
        return {ref.name: ref.target_commit for ref in found.branches}

    def request(self, what: str, fn: Callable[[Any], T]) -> T:
        """``fn(api)`` on this remote's ``HfApi`` under the retry policy, failing like the calls above."""
        return self._call(what, lambda: fn(self._api))

    def download(self, dest: Path, revision: str) -> None:
        """Materialise every file of commit ``revision`` under ``dest``."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RevisionNotFoundError

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)

        def fetch():
            try:
                snapshot_download(
                    self.repo_id,
                    repo_type=REPO_TYPE,
                    revision=revision,
                    local_dir=dest,
                    endpoint=self.endpoint,
                    token=self.token,
                    library_name="qk-sniffer",
                )
            except RevisionNotFoundError:
                raise RemoteMovedError(f"{self.describe()}: revision {revision} no longer exists (history rewritten?)") from None

        try:
            self._call(f"download revision {revision} of", fetch)
        finally:
            shutil.rmtree(dest / ".cache", ignore_errors=True)

    def list_files(self, revision: str) -> dict[str, str]:
        """Path -> sha256 for LFS/Xet files, git blob sha1 for the others, at ``revision``."""
        from huggingface_hub import RepoFile
        from huggingface_hub.errors import RevisionNotFoundError

        def tree():
            try:
                return list(self._api.list_repo_tree(self.repo_id, repo_type=REPO_TYPE, revision=revision, recursive=True))
            except RevisionNotFoundError:
                raise RemoteMovedError(f"{self.describe()}: revision {revision} no longer exists") from None

        items = self._call(f"list the files of revision {revision} of", tree)
        return {f.path: (f.lfs.sha256 if f.lfs else f.blob_id) for f in items if isinstance(f, RepoFile)}

    def commit(self, files: dict[str, Path], parent: str | None, message: str) -> str:
        """Upload ``files`` as one commit on the branch iff its head is still ``parent``.

        ``parent=None`` means nothing was pulled: the repository (private per ``output.private``) or
        the branch is created first; if it exists by then, someone else got there first and
        :class:`RemoteMovedError` is raised. Files equal to those at ``parent`` are not sent;
        if none differs, ``parent`` is returned without a commit.
        """
        if not self.token:
            require_hub_token(self.repo_id)
        named = {_check_rel(rel): Path(p) for rel, p in files.items()}
        for rel, p in named.items():
            if not p.is_file():
                raise FileNotFoundError(f"cannot push {rel}: {p} does not exist")
        if parent is None:
            parent = self._first_push_base()
        remote = self.list_files(parent)
        changed = {rel: p for rel, p in sorted(named.items()) if remote.get(rel) not in file_hashes(p)}
        if not changed:
            current = self.head()
            if current != parent:
                raise RemoteMovedError(f"{self.describe()}: head is {current}, not the pulled revision {parent}")
            log.info("%s already holds these %d files at %s; nothing to commit", self.describe(), len(named), parent)
            return parent
        return self._create_commit(changed, parent, message)

    # ------------------------------------------------------------------ internals
    def _first_push_base(self) -> str:
        """Create the repository or the branch for a first push; return the sha to commit on."""
        from huggingface_hub.errors import HfHubHTTPError

        def create_repo() -> bool:
            try:
                self._api.create_repo(self.repo_id, repo_type=REPO_TYPE, private=self.private, exist_ok=False)
                return True
            except HfHubHTTPError as err:
                if http_status(err) == 409:
                    return False
                raise

        # a model or space of that name is refused (by branches()) before anything is created
        created = self._call("create", create_repo) if self.branches() is None else False
        if created:
            log.info("created %s %s", "private" if self.private else "public", self.describe())
        head = self.head()
        if head is not None:
            if created:
                return head
            raise RemoteMovedError(f"{self.describe()} exists now but did not when final/ was pulled; pulling it first")

        def create_branch() -> None:
            try:
                self._api.create_branch(self.repo_id, branch=self.branch, repo_type=REPO_TYPE)
            except HfHubHTTPError as err:
                if http_status(err) == 409:
                    raise RemoteMovedError(f"{self.describe()}: the branch was created meanwhile") from None
                raise

        self._call(f"create branch {self.branch} of", create_branch)
        head = self.head()
        if head is None:
            raise HubError(f"created branch {self.branch} of {self.describe()} but cannot read it back")
        log.info("created branch %s of %s at %s", self.branch, self.repo_id, head)
        return head

    def _create_commit(self, changed: dict[str, Path], parent: str, message: str) -> str:
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError

        ops: list = []

        def send() -> str:
            ops[:] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in changed.items()]
            try:
                info = self._api.create_commit(
                    self.repo_id,
                    operations=ops,
                    commit_message=message,
                    repo_type=REPO_TYPE,
                    revision=self.branch,
                    parent_commit=parent,
                )
            except HfHubHTTPError as err:
                if http_status(err) == 412:
                    raise RemoteMovedError(f"{self.describe()}: the branch moved past the pulled revision {parent}") from None
                raise
            return info.oid

        sha = self._call("commit to", send)
        # The client skips the commit when every file equals the branch head's. The files differ
        # from ``parent``, so the head moved (another writer, or this commit landed before its answer
        # was lost): a caller that pulls again finds out which.
        no_op = ops and all(
            getattr(op, "_remote_oid", None) is not None and op._remote_oid == getattr(op, "_local_oid", None) for op in ops
        )
        if no_op and sha != parent:
            raise RemoteMovedError(f"{self.describe()}: head is {sha}, not the pulled revision {parent}")
        log.info("committed %d files to %s: %s", len(changed), self.describe(), sha)
        return sha

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying network failures under ``self.retry``; errors leave with the token masked."""
        return call_with_retries(what, fn, policy=self.retry, where=self.describe(), token=self.token,
                                 sleep=self._sleep, message=self._message)

    def _message(self, failure: Failure) -> str:
        """The one line a failed call ends with: what happened and what to do."""
        from huggingface_hub.errors import OfflineModeIsEnabled

        what, err, detail = failure.what, failure.error, failure.detail
        where = self.describe()
        if any(isinstance(e, OfflineModeIsEnabled) for e in error_chain(err)):
            return (
                f"cannot {what} {where}: HF_HUB_OFFLINE is set; unset it to pull from or push to the Hub "
                "(or remove output.hf_repo_id to run without a remote)"
            )
        endpoint = public_endpoint(self.endpoint)
        knobs = f"{TIMEOUT_VAR} and {RETRIES_VAR} set the timeout per request and the attempts"
        if failure.transient and any(isinstance(e, timeout_errors()) for e in error_chain(err)):
            return (
                f"cannot {what} {where}: no answer within {self.timeout:g}s, {failure.attempts} attempt(s) in "
                f"{failure.elapsed:.0f}s (last: {detail}). Check that {endpoint} is up and reachable from here and "
                f"rerun; completed stages are kept ({knobs})."
            )
        if failure.transient:
            return (
                f"cannot {what} {where}: network or server errors persisted over {failure.attempts} attempt(s) in "
                f"{failure.elapsed:.0f}s (last: {detail}). Check the connection to {endpoint} and rerun; completed "
                f"stages are kept ({knobs})."
            )
        status = http_status(err)
        if status == 401 and not self.token:
            return (
                f"output.hf_repo_id: the Hub wants a token to {what} {where} (HTTP 401) and none is set; put a token "
                f"with write access ({TOKENS_URL}) in HF_TOKEN (environment or .env), or log in with `hf auth login`"
            )
        if status == 401:
            return (
                f"output.hf_repo_id: the Hub token is invalid or expired (HTTP 401); cannot {what} {where}. Put a valid "
                f"token with write access ({TOKENS_URL}) in HF_TOKEN (environment or .env) and rerun"
            )
        if status == 403:
            reason = getattr(err, "server_message", None)
            reason = f": {' '.join(redact(reason, self.token).split())}" if reason else ""
            namespace = self.repo_id.split("/")[0]
            return (
                f"output.hf_repo_id: the Hub token may not {what} {where} (HTTP 403{reason}). Put a token with write "
                f"access to {self.repo_id} in HF_TOKEN (role write, or fine-grained with repo.write on {namespace}; "
                f"{TOKENS_URL}), or set output.hf_repo_id to a dataset repository you can write, and rerun"
            )
        return f"cannot {what} {where}: {detail}"
