"""Remotes and the ``pull-hub`` / ``push-hub`` stages (README.md, "Hub").

A remote holds the published dataset (the tree of ``final/``) as a sequence of revisions. Two
kinds exist: the Hugging Face Hub (``output.hf_repo_id``, :class:`qk_sniffer.hub.HubRemote`) and
a plain directory on a shared filesystem (``output.remote_dir``, :class:`DirRemote`).

Pull replaces ``final/`` with the remote state whenever the remote moved since the last pull:
files the remote does not have are removed from ``final/``, including rows a local merge added
but never pushed. That loses nothing: staged chunks are untouched and the merge that follows a
pull replays them. When the remote does not exist yet, ``final/`` is left as it is, so a first
push publishes a dataset built before a remote was configured.

Push commits only the files of ``final/`` (every regular file except dot-files) whose sha256
differs from what ``final/.snapshot.json`` records for the remote, guarded by the snapshot's
revision. If the remote moved meanwhile it pulls, merges the staged chunks and renders the card
again, then retries (``output.max_push_retries`` times). Remote files are never deleted.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

from filelock import FileLock
from filelock import Timeout as LockTimeout

from . import legacy
from .config import ConfigError, data_root, split_name
from .layout import atomic_output, atomic_write_json, final_dir, remove_stale_temps

log = logging.getLogger("qk_sniffer")

SNAPSHOT_NAME = ".snapshot.json"
PUSH_NAME = "push.json"
PULL_TMP_PREFIX = ".pull-tmp-"
COMMIT_MAX_FILES = 2000  # files per commit; larger pushes are split into several guarded commits
COMMIT_MAX_BYTES = 20 << 30  # bytes per commit
_BUF = 8 << 20


class RemoteMovedError(RuntimeError):
    """The remote head is no longer the revision the commit was based on."""


class RemoteError(RuntimeError):
    """The remote cannot be read or written; the message names the place and the fix."""


class PushError(RuntimeError):
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


# -- hashing and local trees ------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def local_files(base: Path) -> dict[str, Path]:
    """Relative POSIX path -> path of every regular file under ``base``, skipping dot-files and dot-dirs."""
    base = Path(base)
    out: dict[str, Path] = {}
    if not base.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(base).as_posix()] = p
    return out


def hash_files(files: dict[str, Path], known: dict[str, str] | None = None,
               stats: dict[str, list[int]] | None = None) -> tuple[dict[str, str], dict[str, list[int]]]:
    """sha256 per file; a file whose (size, mtime_ns) equals ``stats`` reuses the hash in ``known``."""
    known, stats = known or {}, stats or {}
    hashes: dict[str, str] = {}
    new_stats: dict[str, list[int]] = {}
    for rel, p in files.items():
        st = p.stat()
        key = [st.st_size, st.st_mtime_ns]
        if rel in known and stats.get(rel) == key:
            hashes[rel] = known[rel]
        else:
            hashes[rel] = sha256_file(p)
        new_stats[rel] = key
    return hashes, new_stats


def _check_rel(rel: str) -> str:
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") or part.startswith(".") for part in p.parts):
        raise ValueError(f"remote path {rel!r} must be relative, without '..' or dot-files")
    return p.as_posix()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy_hashed(src: Path, dst: Path) -> str:
    """Copy ``src`` to a temporary name next to ``dst``, fsync, rename; return the content's sha256."""
    h = hashlib.sha256()
    with atomic_output(dst) as out, open(src, "rb") as inp:
        while block := inp.read(_BUF):
            h.update(block)
            out.write(block)
    return h.hexdigest()


# -- a directory as the remote ----------------------------------------------------------------


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
        history.append({"revision": new_head, "parent": parent, "message": message, "at": _now(),
                        "files_changed": len(changed), "files_removed": len(removed)})
        atomic_write_json(self.root / self.RECORD, {"head": new_head, "parent": parent, "message": message,
                                                    "updated_at": _now(), "files": dict(sorted(files.items())),
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


def remote_for(cfg: dict) -> Remote | None:
    """The configured remote: ``output.remote_dir`` (a directory), ``output.hf_repo_id`` (the Hub), or None."""
    out = cfg["output"]
    if out.get("remote_dir") and out.get("hf_repo_id"):
        raise ConfigError(
            "output.remote_dir and output.hf_repo_id are both set; a run pushes to one remote: "
            "remove one of them"
        )
    if out.get("remote_dir"):
        return DirRemote(out["remote_dir"])
    if out.get("hf_repo_id"):
        from .hub import HubRemote

        return HubRemote(cfg)
    return None


# -- snapshot ---------------------------------------------------------------------------------


def read_snapshot(final: Path) -> dict | None:
    p = Path(final) / SNAPSHOT_NAME
    if not p.is_file():
        return None
    try:
        snap = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is not readable JSON; treating final/ as never pulled", p)
        return None
    return snap if isinstance(snap, dict) else None


def _prune_empty_dirs(base: Path) -> None:
    """Remove empty directories below ``base`` (not dot-dirs, not ``base`` itself)."""
    if not base.is_dir():
        return
    for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
        d = Path(dirpath)
        if d != base and not any(part.startswith(".") for part in d.relative_to(base).parts):
            try:
                d.rmdir()
            except OSError:
                pass


# -- the stages -------------------------------------------------------------------------------


def pull(cfg: dict, root: Path | None = None) -> dict:
    """Sync the remote into ``final/`` and write ``final/.snapshot.json`` last; see the module docstring."""
    root = Path(root) if root is not None else data_root(cfg)
    final = final_dir(root)
    remove_stale_temps(final)
    snap_path = final / SNAPSHOT_NAME
    remote = remote_for(cfg)
    # a dataset of the original tool, here or on the remote, is refused before final/ changes (qk_sniffer/legacy.py)
    legacy.refuse_local(root, final=remote is None)
    if remote is None:
        snap = {"remote": None, "revision": None, "pulled_at": _now(), "files": {}}
        atomic_write_json(snap_path, snap)
        return {**snap, "changed": False, "updated": 0, "removed": []}
    desc = remote.describe()
    prev = read_snapshot(final)
    for _attempt in range(5):
        rev = remote.head()
        if prev and prev.get("remote") == desc and prev.get("revision") == rev:
            legacy.refuse_final(final)
            log.info("final/ already holds revision %s of %s", rev, desc)
            return {**prev, "changed": False, "updated": 0, "removed": []}
        if rev is None:  # no dataset there yet: keep final/ (the first push publishes it)
            legacy.refuse_final(final)
            legacy.refuse_remote_dir(remote)
            snap = {"remote": desc, "revision": None, "pulled_at": _now(), "files": {}}
            atomic_write_json(snap_path, snap)
            return {**snap, "changed": False, "updated": 0, "removed": []}
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(PULL_TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=PULL_TMP_PREFIX, dir=root))
        try:
            try:
                legacy.refuse_remote(legacy.in_listing(remote.list_files(rev), desc))  # before downloading it
                remote.download(tmp, rev)
            except RemoteMovedError:
                log.info("%s moved while downloading revision %s; pulling the new head", desc, rev)
                continue
            legacy.refuse_remote(legacy.in_tree(tmp, desc))  # the README layout: known from the files' schema
            result = _swap_in(tmp, final, desc, rev, prev)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("pulled revision %s of %s: %d files updated, %d removed", rev, desc, result["updated"],
                 len(result["removed"]))
        return result
    raise RemoteError(f"{desc} kept moving while pulling; rerun when pushes to it have settled")


def _swap_in(tmp: Path, final: Path, desc: str, rev: str, prev: dict | None) -> dict:
    incoming = local_files(tmp)
    new_hashes, _ = hash_files(incoming)
    final.mkdir(parents=True, exist_ok=True)
    same_remote = bool(prev) and prev.get("remote") == desc
    local = local_files(final)
    local_hashes, _ = hash_files(local, prev.get("files") if same_remote else None,
                                 prev.get("stat") if same_remote else None)
    updated = 0
    for rel, src in incoming.items():
        if local_hashes.get(rel) == new_hashes[rel]:
            continue  # unchanged: keep the local file (and its mtime)
        dst = final / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        updated += 1
    removed = sorted(rel for rel in local if rel not in incoming)
    for rel in removed:
        (final / rel).unlink(missing_ok=True)
    _prune_empty_dirs(final)
    stats = {}
    for rel in incoming:  # final/ now holds exactly the incoming files (moved in, or already equal)
        st = (final / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    snap = {"remote": desc, "revision": rev, "pulled_at": _now(), "files": dict(sorted(new_hashes.items())),
            "stat": stats}
    atomic_write_json(final / SNAPSHOT_NAME, snap)
    return {**snap, "changed": True, "updated": updated, "removed": removed}


def _batches(paths: list[str], sizes: dict[str, int], max_files: int, max_bytes: int) -> list[list[str]]:
    """Data first, README.md last, cut into groups of at most ``max_files`` files / ``max_bytes`` bytes."""
    order = sorted(paths, key=lambda p: (p == "README.md", not p.startswith("data/"), p))
    out: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for p in order:
        if cur and (len(cur) >= max_files or cur_bytes + sizes[p] > max_bytes):
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append(p)
        cur_bytes += sizes[p]
    if cur:
        out.append(cur)
    return out


def push(cfg: dict, root: Path | None = None, *, max_files: int = COMMIT_MAX_FILES,
         max_bytes: int = COMMIT_MAX_BYTES) -> dict:
    """Commit the changed files of ``final/`` to the remote and write ``<root>/push.json``."""
    root = Path(root) if root is not None else data_root(cfg)
    final = final_dir(root)
    remove_stale_temps(final)
    remote = remote_for(cfg)
    legacy.refuse_local(root)  # never publish (or publish next to) a dataset of the original tool
    if remote is None:
        result = {"remote": None, "pushed": False,
                  "reason": "no remote configured (set output.hf_repo_id or output.remote_dir to publish)"}
        atomic_write_json(root / PUSH_NAME, result)
        return result
    if cfg["output"].get("hf_repo_id"):
        from .hub import require_hub_token

        require_hub_token(cfg["output"]["hf_repo_id"])  # fail before any work, not after hashing
    legacy.refuse_remote_dir(remote)
    desc = remote.describe()
    split = split_name(cfg)
    max_retries = int(cfg["output"].get("max_push_retries", 3))
    retries = 0
    commits: list[str] = []
    files_changed = 0
    nbytes = 0
    revision = None
    while True:
        snap = read_snapshot(final) or {}
        same = snap.get("remote") == desc
        parent = snap.get("revision") if same else None
        known = dict(snap.get("files") or {}) if same else {}
        revision = parent
        files = local_files(final)
        hashes, stats = hash_files(files, known, snap.get("stat") if same else None)
        changed = [rel for rel in files if known.get(rel) != hashes[rel]]
        if not changed:
            break
        sizes = {rel: stats[rel][0] for rel in changed}
        batches = _batches(changed, sizes, max_files, max_bytes)
        try:
            for i, batch in enumerate(batches):
                part = f" (part {i + 1} of {len(batches)})" if len(batches) > 1 else ""
                message = f"qk-sniffer: update split {split}, {len(batch)} files{part}"
                rev = remote.commit({rel: files[rel] for rel in batch}, parent, message)
                commits.append(rev)
                parent = revision = rev
                known.update({rel: hashes[rel] for rel in batch})
                old_stat = dict(snap.get("stat") or {}) if same else {}
                old_stat.update({rel: stats[rel] for rel in batch})
                snap = {**snap, "remote": desc, "revision": rev, "pushed_at": _now(), "files": known,
                        "stat": old_stat}
                same = True
                atomic_write_json(final / SNAPSHOT_NAME, snap)
                files_changed += len(batch)
                nbytes += sum(sizes[rel] for rel in batch)
            break
        except RemoteMovedError as exc:
            if retries >= max_retries:
                raise PushError(
                    f"push to {desc} failed: the remote moved {retries + 1} time(s) while pushing (another run is "
                    f"pushing to it; last: {exc}). Rerun the workflow to pull, merge and push again, or raise "
                    "output.max_push_retries."
                ) from exc
            retries += 1
            log.warning("%s moved (%s); pulling, merging and retrying (%d of %d)", desc, exc, retries, max_retries)
            from .merge import merge_staging
            from .readme import render_readme
            from .verify import verify

            pull(cfg, root)
            merge_staging(cfg, root)
            render_readme(cfg, root)
            report = verify(root, cfg=cfg)  # what the retry publishes is checked like the first attempt
            if not report.ok:
                raise PushError(f"after re-merging onto the moved remote, {root} fails verification; nothing more "
                                f"was pushed:\n{report.format()}") from exc
    result = {"remote": desc, "pushed": bool(commits), "commits": commits, "files_changed": files_changed,
              "bytes": nbytes, "retries": retries, "revision": revision, "pushed_at": _now()}
    if not commits:
        result["reason"] = "nothing changed"
    atomic_write_json(root / PUSH_NAME, result)
    return result
