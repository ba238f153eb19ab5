"""Summing up trials, and scanning files for a secret (the Hub token must not reach the disk)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .checks import (
    rule_of,
)
from .harness import TrialResult


def scan_for(secret: str, *roots: Path) -> tuple[list[str], int]:
    """Files under ``roots`` (or the files themselves) holding ``secret`` or its last 16 characters, and how many
    files were read."""
    needles = {secret.encode(), secret[-16:].encode()}
    hits, count = [], 0
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for p in paths:
            data = p.read_bytes()
            count += 1
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits, count


def summarize(results: list[TrialResult], wall_s: float) -> dict:
    """Trial count, kills per aimed stage and per rule they landed in, reruns, wall time, and the verdict."""
    aimed = Counter(a.planned for r in results for a in r.kills)
    landed = Counter(rule for r in results for a in r.kills for rule in ({rule_of(o) for o in a.running} or {"none"}))
    return {
        "trials": len(results),
        "trials_per_stage": dict(Counter(r.stage for r in results)),
        "kills": sum(len(r.kills) for r in results),
        "kills_aimed_at": dict(aimed),
        "kills_landed_in": dict(landed),
        "kills_leaving_temp_files": sum(1 for r in results for a in r.kills if a.temps),
        "reruns": sum(r.reruns for r in results),
        "max_reruns": max((r.reruns for r in results), default=0),
        "resumed_chunks": sum(r.resumed_chunks for r in results),
        "wall_s": round(wall_s, 1),
        "all_identical": all(r.ok for r in results),
        "failed": [r.index for r in results if not r.ok],
    }
