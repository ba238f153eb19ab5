"""The files of a local tree as a remote sees them: which files count, and their sha256.

A push publishes every regular file of ``final/`` except dot-files and dot-directories (the
snapshot, temporaries); a pull compares what it downloaded with ``final/`` the same way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path) -> str:
    """The sha256 of the content of ``path``, hex."""
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


def prune_empty_dirs(base: Path) -> None:
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
