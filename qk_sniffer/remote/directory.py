"""A directory on a shared filesystem as the remote (``output.remote_dir``): :class:`DirRemote`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path, PurePosixPath

from filelock import FileLock
from filelock import Timeout as LockTimeout

from ..layout import atomic_output, atomic_write_json
from ..records import utc_now
from .base import RemoteError, RemoteMovedError

log = logging.getLogger("qk_sniffer")

_BUF = 8 << 20


def _check_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") or part.startswith(".") for part in p.parts):
        raise ValueError(f"remote path {rel!r} must be relative, without '..' or dot-files")
    return p.as_posix()


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy ``src`` to a temporary name next to ``dst``, fsync, rename; return the content's sha256."""
    h = hashlib.sha256()
    with atomic_output(dst) as out, open(src, "rb") as inp:
        while block := inp.read(_BUF):
            h.update(block)
            out.write(block)
    return h.hexdigest()


class DirRemote:
    """A directory on a shared filesystem holding the dataset tree as it is published.

    ``<dir>/.qk-remote.json`` records the head revision and the sha256 of every file; the head is
    a hash of that file list, so a revision names a content state. Commits hold
    ``<dir>/.qk-remote.lock`` (an OS-level lock, released when the holder dies), write every file
    under a temporary name and rename it, and write the record last. Downloads take no lock and
    check the record again at the end. Only the head is stored: downloading an older revision
    raises :class:`RemoteMovedError`.
    """

    RECORD = ".qk-remote.json"
    LOCK = ".qk-remote.lock"
    HISTORY = 100  # commits kept in the record's history

    def __init__(self, path: str | Path, lock_timeout: float = 600.0):
        self.root = Path(path).expanduser().absolute()
        self.lock_timeout = lock_timeout

    def describe(self) -> str:
        return f"dir:{self.root}"

    def _locked(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / self.LOCK), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except LockTimeout as exc:
            raise RemoteError(
                f"{self.root / self.LOCK} stayed locked for {self.lock_timeout:.0f}s: another process is pushing "
                "to this remote directory; wait for it and rerun"
            ) from exc
        return lock

    @contextlib.contextmanager
    def _at_head(self, parent: str | None):
        """Hold the remote's lock and yield its record, iff its head is still ``parent``."""
        lock = self._locked()
        try:
            rec = self._record()
            head = rec["head"] if rec else None
            if head != parent:
                raise RemoteMovedError(f"{self.describe()}: head is {head}, not the pulled revision {parent}")
            yield rec
        finally:
            lock.release()

    def _record(self) -> dict | None:
        p = self.root / self.RECORD
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RemoteError(f"{p} is not readable JSON ({exc}); restore it from a backup or point "
                              "output.remote_dir at a fresh directory") from exc
        if not isinstance(rec, dict) or "head" not in rec or not isinstance(rec.get("files"), dict):
            raise RemoteError(f"{p} is not a qk-sniffer remote record (no head/files)")
        return rec

    @staticmethod
    def revision_id(files: dict[str, str]) -> str:
        blob = json.dumps(sorted(files.items()), separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:40]

    def head(self) -> str | None:
        rec = self._record()
        return rec["head"] if rec else None

    def list_files(self, revision: str | None) -> dict[str, str]:
        rec = self._record()
        head = rec["head"] if rec else None
        if revision != head:
            raise RemoteMovedError(f"{self.describe()}: head is {head}, not {revision}")
        return dict(rec["files"]) if rec else {}

    def download(self, dest: Path, revision: str) -> None:
        """Copy the head's files without taking the lock (readers never block pushers, and a read-only
        remote works); a commit landing meanwhile is detected by re-reading the record afterwards."""
        dest = Path(dest)
        rec = self._record()
        head = rec["head"] if rec else None
        if head != revision:
            raise RemoteMovedError(f"{self.describe()}: head is {head}, not {revision}")
        mismatched = []
        for rel, want in sorted((rec or {}).get("files", {}).items()):
            src = self.root / rel
            if not src.is_file():
                if self.head() != revision:
                    raise RemoteMovedError(f"{self.describe()}: moved while downloading {revision}")
                raise RemoteError(f"{src} is listed in {self.root / self.RECORD} but missing; restore it or "
                                  "push the dataset again from a complete local copy")
            if _copy_hashed(src, dest / rel) != want:
                mismatched.append(rel)
        if self.head() != revision:
            raise RemoteMovedError(f"{self.describe()}: moved while downloading {revision}")
        if mismatched:  # a commit in progress (wait for its lock, then it shows as moved) or an interrupted one
            try:
                self._locked().release()
            except (OSError, RemoteError):
                pass
            if self.head() != revision:
                raise RemoteMovedError(f"{self.describe()}: moved while downloading {revision}")
            log.warning("%s: %d files differ from the record (an interrupted commit?), taken as they are: %s",
                        self.describe(), len(mismatched), ", ".join(mismatched[:5]))

    def _write_record(self, rec: dict | None, files: dict[str, str], parent: str | None, message: str,
                      changed: list[str], removed: list[str]) -> str:
        new_head = self.revision_id(files)
        history = list((rec or {}).get("history") or [])
        history.append({"revision": new_head, "parent": parent, "message": message, "at": utc_now(),
                        "files_changed": len(changed), "files_removed": len(removed)})
        atomic_write_json(self.root / self.RECORD, {"head": new_head, "parent": parent, "message": message,
                                                    "updated_at": utc_now(), "files": dict(sorted(files.items())),
                                                    "history": history[-self.HISTORY:]})
        return new_head

    def commit(self, files: dict[str, Path], parent: str | None, message: str) -> str:
        names = {_check_rel(rel): Path(src) for rel, src in files.items()}
        for rel, src in names.items():
            if not src.is_file():
                raise FileNotFoundError(f"cannot commit {rel}: {src} does not exist")
        with self._at_head(parent) as rec:
            recorded = dict(rec["files"]) if rec else {}
            for rel, src in sorted(names.items()):
                recorded[rel] = _copy_hashed(src, self.root / rel)
            return self._write_record(rec, recorded, parent, message, sorted(names), [])

    def delete(self, paths: list[str], parent: str | None, message: str) -> str:
        """Remove ``paths`` from the remote as one revision (administration; pushes never delete)."""
        with self._at_head(parent) as rec:
            recorded = dict(rec["files"]) if rec else {}
            removed = []
            for rel in paths:
                rel = _check_rel(rel)
                if recorded.pop(rel, None) is not None:
                    (self.root / rel).unlink(missing_ok=True)
                    removed.append(rel)
                    for parent_dir in (self.root / rel).parents:
                        if parent_dir == self.root:
                            break
                        try:
                            parent_dir.rmdir()
                        except OSError:
                            break
            return self._write_record(rec, recorded, parent, message, [], removed)
