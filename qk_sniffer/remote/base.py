"""What every remote is: the :class:`Remote` protocol and the errors a remote raises.

A remote holds the published dataset (the tree of ``final/``) as a sequence of revisions. Two
kinds exist: the Hugging Face Hub (``output.hf_repo_id``, :class:`qk_sniffer.remote.hub.HubRemote`)
and a plain directory on a shared filesystem (``output.remote_dir``,
:class:`qk_sniffer.remote.directory.DirRemote`); :func:`qk_sniffer.remote.configured.remote_for`
picks the one a config names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import QkSnifferError


class RemoteMovedError(QkSnifferError, RuntimeError):
    """The remote head is no longer the revision the commit was based on."""


class RemoteError(QkSnifferError, RuntimeError):
    """The remote cannot be read or written; the message names the place and the fix."""


class PushError(QkSnifferError, RuntimeError):
    """A push gave up (the remote kept moving)."""


@runtime_checkable
class Remote(Protocol):
    """Where the published dataset lives. Revisions are opaque strings; ``None`` means no dataset yet."""

    def describe(self) -> str:
        """A stable, log-safe name of the remote (never a token)."""
        ...

    def head(self) -> str | None:
        """The current revision, or None when the remote does not exist yet."""
        ...

    def download(self, dest: Path, revision: str) -> None:
        """Materialise the full tree of ``revision`` into the empty directory ``dest``.

        Raises :class:`RemoteMovedError` when the remote can only serve its head and that moved.
        """
        ...

    def list_files(self, revision: str) -> dict[str, str]:
        """Relative path -> content hash (the remote's own kind of hash) at ``revision``."""
        ...

    def commit(self, files: dict[str, Path], parent: str | None, message: str) -> str:
        """Upload ``files`` (relative path -> local file) as one new revision iff the head is still ``parent``.

        ``parent=None`` means "the remote must not exist yet". Raises :class:`RemoteMovedError`
        otherwise. Remote files not named are kept. Returns the new revision.
        """
        ...


