"""The rewrite path: a config whose staged keys interleave with or repeat the kept ones (or whose files differ
in Parquet schema or metadata) is decoded, deduplicated, sorted and encoded again.

Rows already in ``final/`` win, and of a key staged twice, the first; a staged row whose key is kept with
another vector is counted as a rounding difference or a conflict (:mod:`qk_sniffer.merge.rounding`). Memory is
bounded by one config (its final file plus its staged rows) per worker thread (``MERGE_WORKERS``).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow as pa

from ..parquet import KEYS, write_parquet_atomic
from ..store import bucket_counts
from .errors import corrupt_final, corrupt_staged
from .inputs import MergeInputs
from .outputs import MergeOutputs
from .rounding import classify_pairs

CONFLICT_EXAMPLES = 5  # conflicting keys .merged.json lists per config
MERGE_WORKERS = min(2, os.cpu_count() or 1)  # configs rewritten at once: memory holds this many configs, no more


def rewrite_config(inputs: MergeInputs, outputs: MergeOutputs, cfg_name: str) -> tuple[str, dict, int, dict]:
    """Rewrite one config's final file as the union of it and its staged files (under its temporary name in
    ``outputs``); returns ``(config, stats, rows in the file, rows per bucket)``."""
    fpath = inputs.final_file(cfg_name)
    merged, stats = union_config(fpath, inputs.staged[cfg_name])
    if stats["changed"]:
        write_parquet_atomic(_to_arrow(merged, inputs.schemas[cfg_name]), outputs.temp_for(fpath))
        stats["method"] = "rewrite"
    else:
        outputs.discard(fpath)  # an append that fell back here may have reserved one
    n, counts = bucket_counts(merged.select("bucket"), fpath) if merged is not None else (0, {})
    return cfg_name, stats, n, counts


def _read(path: Path, what: str) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        if what == "final":
            raise corrupt_final(path, exc) from exc
        raise corrupt_staged(path, exc) from exc


def _read_many(paths: list[Path]) -> pl.DataFrame:
    """All staged files of one config in one call (polars decodes them in parallel)."""
    try:
        return pl.read_parquet(paths)
    except Exception:  # noqa: BLE001 - find the damaged file for the message
        for p in paths:
            _read(p, "staged")
        raise


def _key_list(df: pl.DataFrame, n: int) -> list[list[int]]:
    """The first ``n`` keys of ``df`` in key order (joins do not keep row order)."""
    return [list(r) for r in df.select(KEYS).sort(KEYS).head(n).iter_rows()]


def union_config(final_path: Path, staged_paths: list[Path]) -> tuple[pl.DataFrame | None, dict]:
    """Union of the final file and staged files; returns (merged frame or the final one, stats)."""
    staged = _read_many(staged_paths) if staged_paths else None
    final = _read(final_path, "final") if final_path.is_file() else None
    conflicts = rounding = 0
    rounding_max = 0.0
    examples: list[list[int]] = []
    if staged is None or staged.height == 0:
        return final, {"added": 0, "conflicts": 0, "conflict_examples": [], "rounding": 0, "rounding_max": 0.0,
                       "changed": False}
    if final is not None and final.height:
        both = staged.join(final.select([*KEYS, "vector"]), on=KEYS, how="inner", suffix="_final")
        n, top, bad = classify_pairs(both, "vector_final")
        rounding, rounding_max = rounding + n, max(rounding_max, top)
        conflicts += bad.height
        examples += _key_list(bad, CONFLICT_EXAMPLES)
        new = staged.join(final.select(KEYS), on=KEYS, how="anti")
    else:
        new = staged
    if new.height:
        uniq = new.unique(subset=KEYS, keep="first", maintain_order=True)
        if uniq.height != new.height:  # the same key staged twice (duplicate ids in the source)
            dup = new.filter(pl.struct(KEYS).is_duplicated())
            kept = uniq.join(dup.select(KEYS).unique(), on=KEYS, how="semi")
            cmp = dup.join(kept.select([*KEYS, "vector"]), on=KEYS, how="inner", suffix="_kept")
            n, top, bad = classify_pairs(cmp, "vector_kept")
            rounding, rounding_max = rounding + n, max(rounding_max, top)
            conflicts += bad.height
            examples += _key_list(bad, CONFLICT_EXAMPLES)
        new = uniq
    stats = {"added": new.height, "conflicts": conflicts, "conflict_examples": sorted(examples)[:CONFLICT_EXAMPLES],
             "rounding": rounding, "rounding_max": rounding_max, "changed": new.height > 0}
    if not new.height:
        return final, stats
    merged = new if final is None else pl.concat([final, new], how="vertical_relaxed")
    return merged.sort(KEYS), stats


def _to_arrow(df: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """The frame as Arrow with exactly ``schema``'s types (polars gives large_string); only differing columns cast."""
    table = df.to_arrow()
    cols = []
    for field in schema:
        col = table.column(field.name)
        cols.append(col if col.type == field.type else col.cast(field.type))
    return pa.Table.from_arrays(cols, schema=schema)
