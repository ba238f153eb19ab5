"""What a data root holds and how to read it back (README.md, "What you get").

A data root holds ``staging/chunk-<i>/`` (one sniff-chunk each: its files and, once complete, its
``manifest.json``) and ``final/`` (``data/<split>/<config>/data.parquet`` per config, the dataset card
``README.md`` and ``.merged.json``, the record of the latest merge). The readers here are shared by the
stages that look at a data root (merge, the card, the report, verify, migrate); they only read, and they
import nothing but leaf modules.

Two places record what a split was captured with: the card's front matter (``qk_sniffer: splits:
<split>:``, every split the card knows) and ``final/.merged.json`` (the split the latest merge wrote).
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from .errors import QkSnifferError
from .layout import parse_config_name, staging_dir
from .records import ChunkManifest, MergeRecord, RecordError, read_manifest, read_merge_record

MERGED_NAME = ".merged.json"  # final/.merged.json: what the latest merge did, for one split
CARD_NAME = "README.md"  # final/README.md: the dataset card, its front matter records every split
CHUNK_DIR_RE = re.compile(r"^chunk-(\d+)$")


class StoreError(QkSnifferError, ValueError):
    """A file of the data root cannot be read; the message names it and the fix."""


# -- staged chunks ------------------------------------------------------------------------------


def scan_chunks(root: Path) -> tuple[list[tuple[Path, ChunkManifest]], list[str]]:
    """Complete chunks as ``(dir, manifest)`` sorted by index, and the names of incomplete ones."""
    complete: list[tuple[int, Path, ChunkManifest]] = []
    incomplete: list[str] = []
    base = staging_dir(root)
    if not base.is_dir():
        return [], []
    for d in base.iterdir():
        m = CHUNK_DIR_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        mf = d / "manifest.json"
        if not mf.is_file():
            incomplete.append(d.name)
            continue
        try:
            manifest = read_manifest(mf)
        except RecordError as exc:
            raise StoreError(f"{exc}; delete {d} and rerun that chunk (snakemake {mf})") from exc
        complete.append((int(m.group(1)), d, manifest))
    complete.sort(key=lambda t: t[0])
    incomplete.sort(key=lambda n: int(CHUNK_DIR_RE.match(n).group(1)))
    return [(d, man) for _, d, man in complete], incomplete


# -- final/ -------------------------------------------------------------------------------------


def final_configs(final: Path, split: str) -> dict[str, Path]:
    """Config name -> ``final/data/<split>/<config>/data.parquet`` for every config on disk."""
    base = final / "data" / split
    if not base.is_dir():
        return {}
    out = {}
    for d in sorted(base.iterdir()):
        f = d / "data.parquet"
        if d.is_dir() and f.is_file() and parse_config_name(d.name):
            out[d.name] = f
    return out


def bucket_counts(df: pl.DataFrame | None, path: Path) -> tuple[int, dict[int, int]]:
    """Rows and rows per bucket of a data file: of ``df`` (a frame holding its ``bucket`` column) when given,
    else read from ``path`` (the ``bucket`` column only)."""
    if df is None:
        df = pl.read_parquet(path, columns=["bucket"])
    counts = df.get_column("bucket").value_counts()
    return df.height, {int(b): int(n) for b, n in counts.iter_rows()}


# -- what each split was captured with ------------------------------------------------------------


def merged_record(final: Path, split: str) -> MergeRecord | None:
    """``final/.merged.json`` when it records ``split`` (None when it is missing, unreadable or of another split)."""
    p = final / MERGED_NAME
    if not p.is_file():
        return None
    try:
        merged = read_merge_record(p)
    except RecordError:
        return None
    return merged if merged.split == split else None


def card_splits(front_matter: dict | None) -> dict[str, dict]:
    """The card's records of its splits (``qk_sniffer: splits:`` of its front matter): split -> record, leaving out
    anything that is not a mapping (a hand-edited card)."""
    own = (front_matter or {}).get("qk_sniffer")
    splits = own.get("splits") if isinstance(own, dict) else None
    if not isinstance(splits, dict):
        return {}
    return {s: rec for s, rec in splits.items() if isinstance(rec, dict)}


def card_split_record(front_matter: dict | None, split: str) -> dict:
    """The card's record of ``split`` (``qk_sniffer: splits: <split>:`` of its front matter; empty when none)."""
    return card_splits(front_matter).get(split) or {}


def recorded_sampling(final: Path, split: str, card: dict | None) -> tuple[dict | None, str | None]:
    """Sampling settings recorded for ``split``, and the file that records them.

    ``card`` is the front matter of ``final/README.md``, None when there is no card: a card is the record
    (whether or not it names the split); without one, ``final/.merged.json`` when it is of ``split``."""
    if card is not None:
        rec = card_split_record(card, split).get("sampling")
        if rec:
            return rec, str(final / CARD_NAME)
        return None, None
    merged = merged_record(final, split)
    if merged is not None and merged.sampling:
        return merged.sampling, str(final / MERGED_NAME)
    return None, None
