"""The append path: a config whose every staged key comes after every key already there (new examples) is
grown by concatenating the final file's bytes and the staged files' row groups byte for byte under one new
footer (:func:`qk_sniffer.parquet.concat_files`), without decoding a vector.

The chunks of a run cover disjoint, increasing example ranges and sniff-chunk writes each staged file sorted,
in the final format. Each staged file's key and bucket columns are read (its first and last key, that its keys
strictly increase, its rows per bucket); its vectors are not. Memory stays at a few columns of one staged file
per thread (``APPEND_WORKERS``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..parquet import KEYS, Footer, FooterError, concat_files, read_footer
from ..store import bucket_counts
from .inputs import MergeInputs
from .outputs import MergeOutputs

log = logging.getLogger("qk_sniffer")

APPEND_WORKERS = 8  # configs appended at once: a few columns in memory each; mostly waiting on the disk


def append_config(inputs: MergeInputs, outputs: MergeOutputs, cfg_name: str) -> tuple[str, dict, int, dict] | None:
    """Append one config's staged files to its final file (under its temporary name in ``outputs``); returns
    ``(config, stats, rows in the file, rows per bucket)``, or None when the config needs a rewrite."""
    fpath = inputs.final_file(cfg_name)
    plan = append_plan(fpath, inputs.staged[cfg_name], inputs.footers)
    if plan is None:
        return None
    order, counts, added = plan
    stats = {"added": added, "conflicts": 0, "conflict_examples": [], "rounding": 0, "rounding_max": 0.0,
             "changed": added > 0, "method": "append"}
    n = 0
    if fpath.is_file():  # rows already there: their bucket counts too
        n, there = bucket_counts(None, fpath)
        for b, c in there.items():
            counts[b] = counts.get(b, 0) + c
    try:
        if added:
            n = concat_files([f.path for f in order], outputs.temp_for(fpath), order)
    except FooterError as exc:  # a footer that cannot be carried over (written elsewhere): rewrite instead
        log.info("%s/%s: rewriting instead of appending (%s)", inputs.split, cfg_name, exc)
        return None
    return cfg_name, stats, n, counts


def append_plan(final_path: Path, staged_paths: list[Path],
                 footers: dict[Path, Footer]) -> tuple[list[Footer], dict[int, int], int] | None:
    """How to add ``staged_paths`` to ``final_path`` without decoding vectors, or None when the config needs a
    rewrite. Returns the footers to concatenate in order (the final file's first; none when every staged
    file is already in the final file byte for byte), the bucket counts of the added rows and their number."""
    try:
        staged = [f for f in (footers.get(p) or read_footer(p) for p in staged_paths) if f.num_rows > 0]
        final = (footers.get(final_path) or read_footer(final_path)) if final_path.is_file() else None
        if final is not None and final.num_rows == 0:
            final = None
        if staged and not all(f.same_layout(final or staged[0]) for f in staged):
            return None
        if final is not None:
            staged = [f for f in staged if not _already_in(f, final)]
    except (OSError, FooterError):
        return None  # the rewrite path reads them properly and names a damaged file
    if not staged:
        return [], {}, 0
    spans = []
    counts: dict[int, int] = {}
    for f in staged:
        span = _read_span(f)
        if span is None:
            return None
        first, last, file_counts = span
        spans.append((first, last, f))
        for bucket, c in file_counts.items():
            counts[bucket] = counts.get(bucket, 0) + c
    spans.sort(key=lambda s: s[0])
    prev = None
    if final is not None:
        prev = _last_key(final)
        if prev is None:
            return None
    for first, last, _ in spans:
        if prev is not None and first <= prev:
            return None
        prev = last
    order = [f for _, _, f in spans]
    return ([final] if final is not None else []) + order, counts, sum(f.num_rows for f in order)


def _last_key(footer: Footer) -> tuple[int, int] | None:
    """The largest key of a sorted data file: its last row (None when it has no rows, or its row group
    statistics say a larger example id lives elsewhere, i.e. the file is not sorted)."""
    if footer.num_rows == 0:
        return None
    md = footer.md
    last = pq.ParquetFile(footer.path).read_row_group(md.num_row_groups - 1, columns=KEYS)
    ex, pos = int(last.column(0)[-1].as_py()), int(last.column(1)[-1].as_py())
    col = next(i for i in range(len(md.schema)) if md.schema.column(i).path == "example_id")  # leaf column
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(col).statistics
        if st is not None and st.has_min_max and st.max > ex:
            return None
    return ex, pos


def _strictly_increasing(ex: np.ndarray, pos: np.ndarray) -> bool:
    if len(ex) < 2:
        return True
    d_ex = np.diff(ex)
    return bool(np.all((d_ex > 0) | ((d_ex == 0) & (np.diff(pos) > 0))))


def _already_in(staged: Footer, final: Footer) -> bool:
    """Whether ``staged``'s row groups sit in ``final`` byte for byte: an earlier merge appended this very file."""
    smd, fmd = staged.md, final.md
    if smd.num_row_groups == 0:
        return True
    first, length = smd.row_group(0), staged.body_end - 4
    for i in range(fmd.num_row_groups):
        rg = fmd.row_group(i)
        if rg.num_rows != first.num_rows or rg.total_byte_size != first.total_byte_size:
            continue
        at = _row_group_start(rg) - (_row_group_start(first) - 4)
        if 4 <= at and at + length <= final.body_end and _same_bytes(staged.path, 4, final.path, at, length):
            return True
    return False


def _row_group_start(rg) -> int:
    return min(c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
               for c in (rg.column(j) for j in range(rg.num_columns)))


def _same_bytes(a: Path, at_a: int, b: Path, at_b: int, length: int, block: int = 8 << 20) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(at_a)
        fb.seek(at_b)
        while length > 0:
            n = min(block, length)
            if fa.read(n) != fb.read(n):
                return False
            length -= n
    return True


def _read_span(footer: Footer) -> tuple[tuple[int, int], tuple[int, int], dict[int, int]] | None:
    """First key, last key and bucket counts of a staged file, read from it (None unless its keys strictly increase)."""
    try:
        t = pq.ParquetFile(footer.path).read(columns=[*KEYS, "bucket"])
    except Exception:  # noqa: BLE001 - a damaged file: the rewrite path reads it and names it
        return None
    ex, pos = t.column("example_id").to_numpy(), t.column("position").to_numpy()
    buckets = t.column("bucket").to_numpy()
    if not _strictly_increasing(ex, pos) or (len(buckets) and buckets.min() < 0):
        return None  # unsorted, or not a bucket sniff-chunk writes: the rewrite path reads the file
    counts = {b: c for b, c in enumerate(np.bincount(buckets).tolist()) if c}
    return (int(ex[0]), int(pos[0])), (int(ex[-1]), int(pos[-1])), counts
