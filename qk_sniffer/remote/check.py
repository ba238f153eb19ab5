"""The preflight check of the configured remote: :func:`check_remote`.

Run once before any GPU job, it says in seconds whether the pull and push that end the run can
work, so that a wrong repository id, a missing, expired or read-only token, or a directory this
process cannot write is reported before hours of capture rather than after them. It changes
nothing, locally or remotely. Each refusal is one line naming the config field and the fix.

- ``output.hf_repo_id``: a token is found (``HF_TOKEN`` in the environment or ``.env``, else a
  login ``huggingface_hub`` stored); the Hub accepts it (``whoami``); ``output.hf_repo_id`` names no
  model or space instead of a dataset; the token may write there: its role (``read`` cannot, a
  fine-grained one needs ``repo.write`` on the namespace or the dataset), the namespace (the user or
  one of its organisations, for a repository the first push creates), and the Hub's own answer for
  an existing dataset (``auth_check(write=True)``); the branch holds no dataset of the original tool
  in its per-model-branch layout (:mod:`qk_sniffer.legacy`; its README layout is recognised only from
  the files' schema, when ``pull`` downloads them).
- ``output.remote_dir``: the directory, or its nearest existing parent, accepts a new file from this
  process; its record (``.qk-remote.json``) reads; it holds no dataset of the original tool.

Network time is bounded as in the stages (:mod:`qk_sniffer.remote.hub_http`: ``QK_SNIFFER_HTTP_TIMEOUT_S``
seconds per request, ``QK_SNIFFER_HTTP_RETRIES`` attempts).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import legacy
from .base import RemoteError
from .configured import remote_for
from .credentials import TOKENS_URL, MissingTokenError
from .directory import DirRemote
from .hub import HubRemote
from .hub_http import HubError

ORG_CREATE_ROLES = ("admin", "write", "contributor")  # roles in an organisation that may create repositories


def check_remote(cfg: dict) -> str:
    """Check that the remote of ``cfg`` (a validated config) can be pulled and pushed; return one line saying what
    was found ("no remote" without one). Raises :class:`~qk_sniffer.remote.base.RemoteError` (or
    :class:`~qk_sniffer.remote.credentials.MissingTokenError`, :class:`~qk_sniffer.legacy.OriginalDatasetError`,
    :class:`~qk_sniffer.config.ConfigError`) with one line naming the config field and the fix."""
    remote = remote_for(cfg)
    if remote is None:
        return "no remote"
    if isinstance(remote, DirRemote):
        return _check_dir(remote)
    return _check_hub(remote, bool(cfg["output"].get("private", False)))


# -- a directory --------------------------------------------------------------------------------


def _creates_files(directory: Path) -> bool:
    """Whether this process can create (and remove) a file in ``directory``: tried, not inferred from mode bits."""
    try:
        fd, name = tempfile.mkstemp(prefix=".qk-check-", dir=directory)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def _check_dir(remote: DirRemote) -> str:
    root = remote.root
    nearest = root
    try:
        while not nearest.exists() and nearest.parent != nearest:
            nearest = nearest.parent
    except OSError as exc:  # e.g. a parent this user may not search
        raise RemoteError(f"output.remote_dir: cannot look at {nearest} ({exc.strerror}); make its parent directories "
                          "accessible to this user or point output.remote_dir elsewhere") from None
    if not nearest.is_dir():
        raise RemoteError(f"output.remote_dir: {nearest} is not a directory, so {root} cannot be one; "
                          "point output.remote_dir at a directory (or a path to create one at)")
    if not _creates_files(nearest):
        raise RemoteError(f"output.remote_dir: {nearest} is not writable by this process (uid {os.geteuid()}), so "
                          f"nothing can be pushed to {root}; make it writable (chmod/chown, a read-write mount) or "
                          "point output.remote_dir at a directory this user can write")
    desc = remote.describe()
    if nearest != root:
        return f"remote directory {root}: does not exist yet; {nearest} is writable, the first push creates it"
    lock = root / DirRemote.LOCK
    if lock.exists() and not os.access(lock, os.R_OK | os.W_OK):
        raise RemoteError(f"output.remote_dir: the lock file {lock} is not writable by this process (uid "
                          f"{os.geteuid()}); make it writable or remove it when no push is running")
    head = remote.head()  # reads the record: an unreadable one raises naming the fix
    if head is None:
        legacy.refuse_remote_dir(remote)
        return f"remote directory {root}: writable; holds no dataset yet, the first push creates it"
    legacy.refuse_remote(legacy.in_listing(remote.list_files(head), desc))
    return f"remote directory {root}: writable; at revision {head[:12]}"


# -- the Hub --------------------------------------------------------------------------------------


def _fine_grained_writes(fine: dict, entities: set[tuple[str, str]]) -> bool:
    """Whether a fine-grained token's scopes grant ``repo.write`` on one of ``entities`` ((type, name) pairs)."""
    wanted = {(kind, name.lower()) for kind, name in entities}
    for scope in fine.get("scoped") or []:
        if not isinstance(scope, dict) or not isinstance(scope.get("entity"), dict):
            continue
        entity = (scope["entity"].get("type"), str(scope["entity"].get("name")).lower())
        if entity in wanted and "repo.write" in (scope.get("permissions") or []):
            return True
    return False


def _check_hub(remote: HubRemote, private: bool) -> str:
    repo = remote.repo_id
    namespace = repo.split("/")[0]
    if not remote.token:
        raise MissingTokenError(f"output.hf_repo_id: pushing to {repo} needs a Hub token and none is set; put a write "
                                f"token ({TOKENS_URL}) in HF_TOKEN (environment or .env), or log in with `hf auth login`")
    me = remote.request("check the token for", lambda api: api.whoami())  # HTTP 401 raises naming the fix
    user = me.get("name") or "?"
    orgs = {o["name"]: o.get("roleInOrg") for o in me.get("orgs") or [] if isinstance(o, dict) and o.get("name")}
    access = (me.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    who = f"{me.get('type') or 'user'} {user}" + (f" (token role {role})" if role else "")
    fix = (f"put a token with write access to {repo} in HF_TOKEN (role write, or fine-grained with repo.write on "
           f"{namespace}; {TOKENS_URL}), or set output.hf_repo_id to a dataset repository you can write")
    if role == "read":
        raise HubError(f"output.hf_repo_id: the Hub token of {user} is read-only (role read) and cannot push to {repo}; "
                       f"{fix}", 403)
    branches = remote.branches()  # refuses a model or space of that name
    own = namespace.lower() == user.lower()  # the Hub's names do not differ by case alone
    owner = ("user" if own else "org", namespace)
    if role == "fineGrained":
        entities = {owner} if branches is None else {owner, ("dataset", repo)}
        if not _fine_grained_writes(access.get("fineGrained") or {}, entities):
            where = namespace if branches is None else f"{namespace} or on dataset {repo}"
            raise HubError(f"output.hf_repo_id: the fine-grained Hub token of {user} has no repo.write permission on "
                           f"{where}, so it cannot push to {repo}; {fix}", 403)
    if branches is None:
        role_in = {o.lower(): r for o, r in orgs.items()}
        # an organisation listed without a role (not reported) is left to the push to find out
        if not own and (namespace.lower() not in role_in or role_in[namespace.lower()] not in (None, *ORG_CREATE_ROLES)):
            known = ", ".join(f"{o} ({r})" for o, r in sorted(orgs.items())) or "none"
            raise HubError(f"output.hf_repo_id: {repo} does not exist and the token's user {user} cannot create it: "
                           f"{namespace} is neither {user} nor an organisation where it may create repositories "
                           f"(its organisations: {known}); set output.hf_repo_id to {user}/<name> or to a namespace "
                           "you can write, or use a token of a member of " + namespace, 403)
        state = f"does not exist yet; the first push creates it ({'private' if private else 'public'})"
        return f"{remote.describe()}: writable as {who}; {state}"
    remote.request("write to", lambda api: api.auth_check(repo, repo_type="dataset", write=True))
    head = branches.get(remote.branch)
    if head is None:
        return f"{remote.describe()}: writable as {who}; branch {remote.branch} does not exist yet, the first push creates it"
    legacy.refuse_remote(legacy.in_listing(remote.list_files(head), remote.describe()))
    return f"{remote.describe()}: writable as {who}; at revision {head[:12]}"
