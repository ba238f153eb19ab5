"""Checks after a kill: temporary files, damaged or half-written files in the data root and on the remote, what
Snakemake left marked incomplete, which rule an output belongs to."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from fnmatch import fnmatchcase
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qk_sniffer.front_matter import split_front_matter

from ..fakehub import FakeHub
from ..workflow_runs import final_files, manifests
from .settings import (
    SPLIT,
    TARGETS,
    TEMP_MARKERS,
)


def is_temp_name(name: str) -> bool:
    return any(m in name for m in TEMP_MARKERS)


def temp_files(base: Path) -> list[str]:
    """Temporary names (``.tmp``, ``.pull-tmp-``) anywhere under ``base``, relative to it."""
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if is_temp_name(p.name))


def glob_match(pattern: str, path: str) -> bool:
    """``path`` matches the ``data_files`` glob ``pattern`` (``*`` never crosses a ``/``)."""
    a, b = pattern.split("/"), path.split("/")
    return len(a) == len(b) and all(fnmatchcase(y, x) for x, y in zip(a, b))


def card_configs(card: bytes | str, source: str = "README.md") -> list:
    """The ``configs`` list of a dataset card's front matter."""
    text = card.decode("utf-8") if isinstance(card, bytes) else card
    return split_front_matter(text, source)[0].get("configs") or []


def card_globs(card: bytes | str, source: str = "README.md") -> dict[str, list[str]]:
    """Config name -> every ``data_files`` glob of the card's front matter."""
    text = card.decode("utf-8") if isinstance(card, bytes) else card
    fm, _ = split_front_matter(text, source)
    out: dict[str, list[str]] = {}
    for entry in fm.get("configs") or []:
        globs = out.setdefault(entry["config_name"], [])
        for item in entry.get("data_files") or []:
            paths = item["path"]
            globs.extend([paths] if isinstance(paths, str) else paths)
    return out


def tree_problems(files: dict[str, bytes], where: str) -> list[str]:
    """Why a published tree is not a complete state: unreadable Parquet, temporary names, a card naming absent files."""
    problems = [f"{where}: temporary file {p}" for p in files if any(is_temp_name(part) for part in p.split("/"))]
    for path, data in sorted(files.items()):
        if path.endswith(".parquet"):
            try:
                pq.read_table(pa.BufferReader(data))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
                problems.append(f"{where}: {path} is not readable Parquet ({type(exc).__name__}: {exc})")
    if "README.md" in files:
        try:
            globs = card_globs(files["README.md"], f"{where}:README.md")
        except Exception as exc:  # noqa: BLE001
            return [*problems, f"{where}: README.md front matter does not parse ({exc})"]
        for name, patterns in sorted(globs.items()):
            for pattern in patterns:
                if not any(glob_match(pattern, p) for p in files):
                    problems.append(f"{where}: README.md config {name} lists {pattern}, which matches no file")
    return problems


def remote_problems(hub: FakeHub, repo_id: str) -> list[str]:
    """Every commit ever on the branch must be a complete state (no repository at all is one too)."""
    if hub.head(repo_id) is None:
        return []
    problems = []
    for commit in hub.history(repo_id):
        problems += tree_problems({p: b.data for p, b in commit.files.items()}, f"remote commit {commit.sha[:10]}")
    return problems


def local_problems(root: Path) -> list[str]:
    """Files of the data root that exist but are damaged (what a kill may never leave behind)."""
    problems = []
    for rel in [*TARGETS.values(), "staging/chunk-*/manifest.json"]:
        for p in sorted(root.glob(rel)):
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    problems.append(f"{p.relative_to(root)} is not readable JSON ({exc})")
    readme = root / "final" / "README.md"
    if readme.is_file():
        try:
            card_globs(readme.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"final/README.md front matter does not parse ({exc})")
    for sub in ("final", "staging"):
        for p in sorted((root / sub).rglob("*.parquet")):
            if is_temp_name(p.name):
                continue
            try:
                pq.read_table(p)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{p.relative_to(root)} is not readable Parquet ({type(exc).__name__}: {exc})")
    return problems


def read_configs(root: Path) -> dict[str, pl.DataFrame]:
    """Config name -> its final rows sorted by (example_id, position)."""
    return {name: pl.read_parquet(p).sort(["example_id", "position"]) for name, p in final_files(root, SPLIT).items()}


def resumed_chunks(root: Path) -> int:
    """Chunk manifests that record a resume from checkpoints."""
    n = 0
    for mf in manifests(root).values():
        try:
            n += bool(json.loads(mf.read_text(encoding="utf-8")).get("resumed"))
        except (OSError, ValueError):
            pass
    return n


def incomplete_jobs(work: Path) -> list[str]:
    """Outputs Snakemake marked as being made when it died (its ``.snakemake/incomplete`` markers)."""
    out = []
    for marker in sorted((work / ".snakemake" / "incomplete").glob("*")):
        if marker.is_file() and marker.name != "migration_underway":
            try:
                out.append(base64.urlsafe_b64decode(marker.name.encode()).decode())
            except ValueError:
                out.append(marker.name)
    return out


def rule_of(output: str) -> str:
    if "/staging/chunk-" in f"/{output}":
        return "sniff_chunk"
    for rule, rel in TARGETS.items():
        if output.endswith(rel):
            return rule
    if "/report/" in f"/{output}/":
        return "render_report"
    return output


def final_has_temp(root: Path) -> bool:
    """A temporary file under final/data (a merge writing)."""
    base = root / "final" / "data"
    if not base.is_dir():
        return False
    with contextlib.suppress(OSError):
        for split in os.scandir(base):
            if split.is_dir():
                for cfg in os.scandir(split.path):
                    if cfg.is_dir() and any(is_temp_name(e.name) for e in os.scandir(cfg.path)):
                        return True
    return False
