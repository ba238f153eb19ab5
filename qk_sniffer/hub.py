"""The Hugging Face Hub as a remote (``output.hf_repo_id``), through ``huggingface_hub``.

:class:`HubRemote` implements the remote protocol of :mod:`qk_sniffer.remote` on a dataset
repository: ``head`` is the branch's commit sha, ``download`` materialises a commit with
``snapshot_download``, ``commit`` uploads files as one ``create_commit`` guarded by
``parent_commit``, so a commit lands only if the branch still points at the pulled revision (the
Hub answers 412 otherwise, raised here as :class:`~qk_sniffer.remote.RemoteMovedError`). Nothing
is ever deleted on the remote.

- The endpoint is ``HF_ENDPOINT`` when set (as for the client itself), else the client's default.
- The token is ``HF_TOKEN`` from :mod:`qk_sniffer.secrets` (the environment, then ``.env``), else
  the one ``huggingface_hub`` finds on its own (a login stored by ``hf auth login``): :func:`hub_token`.
  It is passed explicitly to the client. Every exception raised from here has the token masked.
- Bounded network time: every request of the client's shared HTTP client (ours and, in this
  process, any other user of ``huggingface_hub``) times out after ``QK_SNIFFER_HTTP_TIMEOUT_S``
  seconds (default 60; connecting: at most 10), also where the client asks for a longer timeout or
  none. It is set through the client's own hook, ``huggingface_hub.set_client_factory``
  (:func:`bound_http`). Xet transfers (``hf_xet``) run outside that client and keep their own.
- Network failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential
  backoff under a :class:`RetryPolicy` (``QK_SNIFFER_HTTP_RETRIES`` attempts in all, default 5,
  and a bound on the total time), then reported on one line naming the repository, the endpoint and
  what to do. ``huggingface_hub`` retries some calls on its own as well (file downloads, LFS uploads).
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
import importlib
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .config import ConfigError
from .remote import RemoteError, RemoteMovedError
from .secrets import MissingTokenError, get_token, redact

log = logging.getLogger("qk_sniffer")

T = TypeVar("T")
REPO_TYPE = "dataset"
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_BUF = 8 << 20
TIMEOUT_VAR = "QK_SNIFFER_HTTP_TIMEOUT_S"
RETRIES_VAR = "QK_SNIFFER_HTTP_RETRIES"
DEFAULT_TIMEOUT_S = 60.0
MAX_CONNECT_S = 10.0
TOKENS_URL = "https://huggingface.co/settings/tokens"


def _httpx_errors(name: str) -> tuple[type[BaseException], ...]:
    found = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_TRANSPORT_ERRORS = (TimeoutError, ConnectionError, *_httpx_errors("TransportError"))
_TIMEOUT_ERRORS = (TimeoutError, *_httpx_errors("TimeoutException"))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a Hub call that failed on the network.

    ``attempts`` tries in all, waiting ``base_delay * 2**k`` (at most ``max_delay``) in between,
    and no new attempt once ``max_total`` seconds have passed since the first.
    """

    attempts: int = 5
    base_delay: float = 2.0
    max_delay: float = 30.0
    max_total: float = 300.0


DEFAULT_RETRY = RetryPolicy()


def _env_number(name: str, cast: Callable[[str], float], default: float, what: str) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise ConfigError(f"{name}={raw!r} is not {what}; unset it (default {default:g}) or set e.g. {name}={default:g}")
    return value


def http_timeout() -> float:
    """Seconds a request may wait for the Hub (``QK_SNIFFER_HTTP_TIMEOUT_S``, default 60)."""
    return _env_number(TIMEOUT_VAR, float, DEFAULT_TIMEOUT_S, "a positive number of seconds")


def retry_policy() -> RetryPolicy:
    """:data:`DEFAULT_RETRY` with ``QK_SNIFFER_HTTP_RETRIES`` attempts in all when that is set."""
    return RetryPolicy(attempts=int(_env_number(RETRIES_VAR, int, DEFAULT_RETRY.attempts, "a positive whole number")))


_BOUND_LOCK = threading.Lock()
_bound: list[float | None] = [None]  # the timeout of the client factory installed by bound_http, if any


def bound_http(seconds: float | None) -> None:
    """Make ``huggingface_hub``'s shared HTTP client time out every request after ``seconds``.

    The client's default factory has no timeout, and several calls pass ``timeout=None`` or 60 s
    explicitly; a request hook caps each phase (connect at most :data:`MAX_CONNECT_S`) at
    ``seconds`` whatever the call asked for. Installed through ``set_client_factory``, which closes
    the current client, hence only when the value changes. ``None`` restores the default factory.
    """
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    with _BOUND_LOCK:
        if _bound[0] == seconds:
            return
        if seconds is None:
            set_client_factory(default_client_factory)
            _bound[0] = None
            return
        caps = {"connect": min(seconds, MAX_CONNECT_S), "read": seconds, "write": seconds, "pool": seconds}

        def cap(request: Any) -> None:
            asked = request.extensions.get("timeout") or {}
            capped = {k: limit if asked.get(k) is None else min(asked[k], limit) for k, limit in caps.items()}
            request.extensions = {**request.extensions, "timeout": capped}

        def factory():
            client = default_client_factory()
            client.timeout = tuple(caps.values())
            client.event_hooks = {**client.event_hooks, "request": [*client.event_hooks["request"], cap]}
            return client

        set_client_factory(factory)
        _bound[0] = seconds


def hub_token() -> str | None:
    """``HF_TOKEN`` (environment, then ``./.env``), else the token ``huggingface_hub`` finds (a stored login)."""
    from huggingface_hub import get_token as client_token

    return get_token() or client_token()


def require_hub_token(repo_id: str) -> str:
    """The token for a push to ``repo_id``; raises :class:`MissingTokenError` saying how to provide one."""
    token = hub_token()
    if not token:
        raise MissingTokenError(
            f"push to {repo_id} needs HF_TOKEN in the environment or .env (a write token from {TOKENS_URL}; "
            "e.g. a line HF_TOKEN=hf_... in ./.env), or a login stored by `hf auth login`"
        )
    return token


class HubError(RemoteError):
    """A Hub call failed for good; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class RepoTypeError(HubError):
    """``output.hf_repo_id`` names a model or space repository (and no dataset of that name exists)."""


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _status(err: BaseException) -> int | None:
    """The HTTP status of the first error in the chain that carries a response."""
    for e in _chain(err):
        response = getattr(e, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _is_transient(err: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    for e in _chain(err):
        if isinstance(e, OfflineModeIsEnabled):
            return False
        code = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(code, int):
            return code in TRANSIENT_STATUS
        if isinstance(e, _TRANSPORT_ERRORS):
            return True
    return False


def _public_endpoint(url: str) -> str:
    """``url`` without credentials, query or fragment."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


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
        return f"hf dataset {self.repo_id}@{self.branch} at {_public_endpoint(self.endpoint)}"

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
                        f"output.hf_repo_id: {self.repo_id} is a {kind} repository at {_public_endpoint(self.endpoint)}, "
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
                if _status(err) == 409:
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
                if _status(err) == 409:
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
                if _status(err) == 412:
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
        policy = self.retry
        start = time.monotonic()
        delay = policy.base_delay
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except (RemoteMovedError, RemoteError):
                raise
            except Exception as err:
                elapsed = time.monotonic() - start
                transient = _is_transient(err)
                # one line: the server's own message when it sent one, not the client's multi-line text
                text = getattr(err, "server_message", None) or str(err)
                detail = " ".join(f"{type(err).__name__}: {redact(text, self.token)}".split())
                if transient and attempt < policy.attempts and elapsed + delay <= policy.max_total:
                    log.warning(
                        "%s: %s failed (%s); retrying in %.1fs (attempt %d of %d)",
                        self.describe(),
                        what,
                        detail.splitlines()[0],
                        delay,
                        attempt + 1,
                        policy.attempts,
                    )
                    self._sleep(delay)
                    delay = min(delay * 2, policy.max_delay)
                    continue
                failure = HubError(
                    redact(self._message(what, err, detail, attempt, elapsed, transient), self.token), _status(err)
                )
                # keep the original exception as the cause unless a message in its chain holds the token
                cause = err if all(redact(str(e), self.token) == str(e) for e in _chain(err)) else None
            # raised outside the handler, so a suppressed cause is not kept as the implicit context either
            raise failure from cause

    def _message(self, what: str, err: BaseException, detail: str, attempt: int, elapsed: float, transient: bool):
        from huggingface_hub.errors import OfflineModeIsEnabled

        where = self.describe()
        if any(isinstance(e, OfflineModeIsEnabled) for e in _chain(err)):
            return (
                f"cannot {what} {where}: HF_HUB_OFFLINE is set; unset it to pull from or push to the Hub "
                "(or remove output.hf_repo_id to run without a remote)"
            )
        endpoint = _public_endpoint(self.endpoint)
        knobs = f"{TIMEOUT_VAR} and {RETRIES_VAR} set the timeout per request and the attempts"
        if transient and any(isinstance(e, _TIMEOUT_ERRORS) for e in _chain(err)):
            return (
                f"cannot {what} {where}: no answer within {self.timeout:g}s, {attempt} attempt(s) in {elapsed:.0f}s "
                f"(last: {detail}). Check that {endpoint} is up and reachable from here and rerun; completed stages "
                f"are kept ({knobs})."
            )
        if transient:
            return (
                f"cannot {what} {where}: network or server errors persisted over {attempt} attempt(s) in "
                f"{elapsed:.0f}s (last: {detail}). Check the connection to {endpoint} and rerun; completed stages "
                f"are kept ({knobs})."
            )
        status = _status(err)
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
