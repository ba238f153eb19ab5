"""The ``pull-hub`` / ``push-hub`` stages: :func:`pull` and :func:`push` (README.md, "Hub").

Pull replaces ``final/`` with the remote state whenever the remote moved since the last pull:
files the remote does not have are removed from ``final/``, including rows a local merge added
but never pushed. That loses nothing: staged chunks are untouched and the merge that follows a
pull replays them. When the remote does not exist yet, ``final/`` is left as it is, so a first
push publishes a dataset built before a remote was configured.

Push commits only the files of ``final/`` (every regular file except dot-files) whose sha256
differs from what ``final/.snapshot.json`` records for the remote, guarded by the snapshot's
revision. If the remote moved meanwhile it pulls, lets the caller's ``replay`` step redo the local
work on top (the stage layer, :mod:`qk_sniffer.sweep_stages`, merges the staged chunks, renders
the card and verifies), then retries (``output.max_push_retries`` times). Remote files are never
deleted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import legacy
from ..config import data_root, split_name
from ..layout import atomic_write_json, final_dir, remove_stale_temps
from ..records import utc_now
from .base import PushError, RemoteError, RemoteMovedError
from .configured import remote_for
from .credentials import require_hub_token
from .local_tree import hash_files, local_files, prune_empty_dirs

log = logging.getLogger("qk_sniffer")

SNAPSHOT_NAME = ".snapshot.json"
PUSH_NAME = "push.json"
PULL_TMP_PREFIX = ".pull-tmp-"
COMMIT_MAX_FILES = 2000  # files per commit; larger pushes are split into several guarded commits
COMMIT_MAX_BYTES = 20 << 30  # bytes per commit


def read_snapshot(final: Path) -> dict | None:
    """``final/.snapshot.json`` (what the last pull or push recorded), or None when missing or unreadable."""
    p = Path(final) / SNAPSHOT_NAME
    if not p.is_file():
        return None
    try:
        snap = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("%s is not readable JSON; treating final/ as never pulled", p)
        return None
    return snap if isinstance(snap, dict) else None


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
        snap = {"remote": None, "revision": None, "pulled_at": utc_now(), "files": {}}
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
            snap = {"remote": desc, "revision": None, "pulled_at": utc_now(), "files": {}}
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
    prune_empty_dirs(final)
    stats = {}
    for rel in incoming:  # final/ now holds exactly the incoming files (moved in, or already equal)
        st = (final / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    snap = {"remote": desc, "revision": rev, "pulled_at": utc_now(), "files": dict(sorted(new_hashes.items())),
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


def push(cfg: dict, root: Path | None = None, *, replay: Callable[[], None] | None,
         max_files: int = COMMIT_MAX_FILES, max_bytes: int = COMMIT_MAX_BYTES) -> dict:
    """Commit the changed files of ``final/`` to the remote and write ``<root>/push.json``.

    When the remote moved past the pulled revision, :func:`pull` brings it into ``final/`` and
    ``replay()`` redoes the local work on top of it (merge the staged chunks, render the card,
    verify; raising, e.g. :class:`~qk_sniffer.remote.base.PushError`, when the result must not be
    published), then the push starts over, at most ``output.max_push_retries`` times. With
    ``replay=None`` a moved remote ends the push at once with :class:`PushError` (its cause the
    :class:`RemoteMovedError`), for a caller that replays on its own.
    """
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
                snap = {**snap, "remote": desc, "revision": rev, "pushed_at": utc_now(), "files": known,
                        "stat": old_stat}
                same = True
                atomic_write_json(final / SNAPSHOT_NAME, snap)
                files_changed += len(batch)
                nbytes += sum(sizes[rel] for rel in batch)
            break
        except RemoteMovedError as exc:
            if replay is None or retries >= max_retries:
                raise PushError(
                    f"push to {desc} failed: the remote moved {retries + 1} time(s) while pushing (another run is "
                    f"pushing to it; last: {exc}). Rerun the workflow to pull, merge and push again, or raise "
                    "output.max_push_retries."
                ) from exc
            retries += 1
            log.warning("%s moved (%s); pulling, merging and retrying (%d of %d)", desc, exc, retries, max_retries)
            pull(cfg, root)
            replay()  # what the retry publishes is merged and checked like the first attempt
    result = {"remote": desc, "pushed": bool(commits), "commits": commits, "files_changed": files_changed,
              "bytes": nbytes, "retries": retries, "revision": revision, "pushed_at": utc_now()}
    if not commits:
        result["reason"] = "nothing changed"
    atomic_write_json(root / PUSH_NAME, result)
    return result
