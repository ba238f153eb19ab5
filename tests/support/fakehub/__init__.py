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
``datasets`` at it. Test modules import it (``from .support.fakehub import
fake_hub_fixture``; the fixture's name is ``fake_hub``) rather than getting it from conftest.

Standard library only (``http.server``); the fixture imports pytest and the clients it configures.
"""

from .clients import point_clients_at
from .hub import FakeHub
from .state import Blob, Commit, Fault, HubHTTPError, Repo, RequestRecord, TokenInfo, git_blob_sha1, hub_date

try:
    from .clients import fake_hub_fixture
except ImportError:  # no pytest: the fake and point_clients_at work without it, only the fixture is missing
    pass

__all__ = [
    "Blob",
    "Commit",
    "FakeHub",
    "Fault",
    "HubHTTPError",
    "Repo",
    "RequestRecord",
    "TokenInfo",
    "fake_hub_fixture",
    "git_blob_sha1",
    "hub_date",
    "point_clients_at",
]
