"""``merge-staging``: replay staged chunks into ``final/`` (README.md, "What you get": how a merge appends).

Per ``(split, config)`` the final file and the staged chunk files are unioned on
``(example_id, position)``; rows already in ``final/`` win (and of a key staged twice, the first).
A staged row whose key is kept with another vector is a *rounding difference* when the two vectors
differ by no more than float rounding across batch shapes allows (:data:`ROUNDING_RTOL`), else a
*conflict*; ``final/.merged.json`` counts both per config, and only conflicts are warned about.
Only files whose row set grows are rewritten, so a second merge of the same chunks touches nothing.

A merge is all or nothing: every file it grows and ``.merged.json`` are written under temporary
names next to their places and renamed into place only once all of them are written. A merge that
fails (a full disk, a damaged file) removes what it wrote and leaves ``final/`` exactly as it was;
the price is room for the new version of each file it grows next to the old one until the end.

Two ways to write a grown file, chosen per config:

- **append** when every staged row's key comes after every key already there (new examples: the
  chunks of a run cover disjoint, increasing example ranges and sniff-chunk writes each staged file
  sorted, in the final format): the final file's bytes and the staged files' row groups are
  concatenated byte for byte under one new footer (``qk_sniffer.parquet.concat_files``). A staged
  file that still matches the record its chunk's manifest keeps of it (size and footer digest) is
  taken at that record's word (first and last key, bucket counts, rows, layout, where its footer's
  offsets lie): its keys are not read and its footer is neither parsed nor walked. Otherwise its
  key and bucket columns are read. Memory stays at a few columns of one staged file per thread
  (``APPEND_WORKERS``).
- **rewrite** otherwise (keys that interleave or repeat, or files whose Parquet schema or metadata
  differ): the union is decoded, deduplicated, sorted and encoded again. Memory is bounded by one
  config (its final file plus its staged rows) per worker thread (``MERGE_WORKERS``, two at most).

Both give the same rows in the same order; ``final/.merged.json`` records which one each touched
config took (``methods``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import legacy
from .chunk_plan import describe_config_change, manifest_fingerprint_matches
from .config import chunk_fingerprint, data_root, sampling_settings, split_name
from .layout import (
    DiskFullError,
    atomic_write_json,
    data_file,
    disk_full_errno,
    final_dir,
    parse_config_name,
    remove_stale_temps,
    staging_dir,
)
from .parquet import KEYS, Footer, FooterError, concat_files, read_footer, write_parquet_atomic

log = logging.getLogger("qk_sniffer")

MERGED_NAME = ".merged.json"
CHUNK_DIR_RE = re.compile(r"^chunk-(\d+)$")
CONFLICT_EXAMPLES = 5
MERGE_WORKERS = min(2, os.cpu_count() or 1)  # configs rewritten at once: memory holds this many configs, no more
APPEND_WORKERS = 8  # configs appended at once: a few columns in memory each; mostly waiting on the disk


ROUNDING_RTOL: dict[str, float] = {"float32": 1e-5, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}
"""How far a staged vector may lie from the kept vector of its key and still count as a rounding difference.

A pair of rows (staged ``s``, kept ``k``, same key) whose vectors are not equal element for element (NaN equal
to NaN) is a *rounding difference* when ``max_i |s_i - k_i| <= ROUNDING_RTOL[p] * scale`` and a *conflict*
otherwise, where ``scale = max(max_i |s_i|, max_i |k_i|, smallest normal number of p)`` (a tolerance relative
to the larger of the two rows' largest elements) and ``p`` is the coarser of the precisions the two rows'
values have: ``bfloat16`` for a row whose every value is a bfloat16 number (a float32 column of a model run in
bf16: the low 16 bits of each float are zero), else ``float16`` for a row whose every value is a float16 number
(``capture.vector_dtype: float16``, or a model run in fp16), else ``float32``. The relative difference
recorded is ``max_i |s_i - k_i| / scale``.

- float32: 1e-5, about 84 float32 ulps of the row's largest element. The same examples run in batches of other
  shapes differ by up to ~2e-6 (on the CPU, 3% of the tiny test model's rows differ between batch sizes 8 and
  3, by at most 1.9e-6; a user's extended dataset showed 2e-6), so 1e-5 leaves a factor of five; it is also
  the bound the tests hold every stored vector to against q/k recomputed from the weights.
- float16 (11 significant bits): 2**-9, two float16 ulps of the row's largest element (one ulp is at most
  2**-10 of it): rounding a float32 difference of ~2e-6 to float16 flips at most one ulp of an element.
- bfloat16 (8 significant bits): 2**-6, two bfloat16 ulps of the row's largest element (one ulp is at most
  2**-7 of it, a half-ulp rounding ~4e-3).

Whatever the class, the kept row stays as it was: the classification only decides what is reported.
"""
ROUNDING_BLOCK = 1 << 14  # rows compared at once: the comparison's temporaries stay at tens of MB (head dim 128)
_TINY = {"float32": float(np.finfo(np.float32).tiny), "float16": float(np.finfo(np.float16).tiny),
         "bfloat16": float(np.finfo(np.float32).tiny)}  # bfloat16 has float32's exponent range


class MergeError(ValueError):
    """Merging would corrupt or mix the dataset; the message names the files and the fix."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- reading what is on disk ------------------------------------------------------------------


def scan_chunks(root: Path) -> tuple[list[tuple[Path, dict]], list[str]]:
    """Complete chunks as ``(dir, manifest)`` sorted by index, and the names of incomplete ones."""
    complete: list[tuple[int, Path, dict]] = []
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
            manifest = json.loads(mf.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MergeError(
                f"{mf} is not readable JSON ({exc}); delete {d} and rerun that chunk "
                f"(snakemake {mf})"
            ) from exc
        complete.append((int(m.group(1)), d, manifest))
    complete.sort(key=lambda t: t[0])
    incomplete.sort(key=lambda n: int(CHUNK_DIR_RE.match(n).group(1)))
    return [(d, man) for _, d, man in complete], incomplete


def recorded_sampling(final: Path, split: str) -> tuple[dict | None, str | None]:
    """Sampling settings recorded for ``split`` in final/README.md (else final/.merged.json), and where."""
    readme = final / "README.md"
    if readme.is_file():
        from .readme import ReadmeError, read_front_matter

        try:
            fm, _ = read_front_matter(readme)
        except ReadmeError as exc:
            raise MergeError(str(exc)) from exc
        rec = (((fm.get("qk_sniffer") or {}).get("splits") or {}).get(split) or {}).get("sampling")
        if rec:
            return rec, str(readme)
        return None, None
    merged = final / MERGED_NAME
    if merged.is_file():
        try:
            prev = json.loads(merged.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, None
        if prev.get("split") == split and prev.get("sampling"):
            return prev["sampling"], str(merged)
    return None, None


def _sampling_diff(recorded: dict, current: dict) -> dict:
    """Keys present in both whose values differ: ``{key: (recorded, current)}``."""
    out = {}
    for k in sorted(set(recorded) & set(current)):
        a, b = recorded[k], current[k]
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            out[k] = (a, b)
    return out


def _schema_key(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def _describe_schema(schema: pa.Schema) -> str:
    vec = schema.field("vector").type if "vector" in schema.names else None
    if isinstance(vec, pa.FixedSizeListType):
        v = f"vector {vec.value_type}[{vec.list_size}]"
    else:
        v = f"vector {vec}"
    return f"{v}; columns {', '.join(schema.names)}"


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


def _corrupt(path: Path, exc: BaseException) -> MergeError:
    return MergeError(
        f"{path} is not readable Parquet ({type(exc).__name__}: {exc}). Nothing was merged into it. Recover by "
        f"deleting it and either pulling the remote again (delete final/.snapshot.json and rerun pull_hub) or "
        f"rerunning the chunks that produced it, then merge again."
    )


# -- writing ----------------------------------------------------------------------------------


def _read(path: Path, what: str) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        if what == "final":
            raise _corrupt(path, exc) from exc
        raise MergeError(f"staged file {path} is not readable Parquet ({exc}); delete its chunk dir and rerun it") from exc


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


def _precision(v: np.ndarray) -> np.ndarray:
    """Per row of ``v`` (float32, rows of one vector each): 2 when every value is a bfloat16 number, else 1 when
    every value is a float16 number, else 0 (see :data:`ROUNDING_RTOL`)."""
    bf16 = ((v.view(np.uint32) & 0xFFFF) == 0).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        f16 = ((v.astype(np.float16).astype(np.float32) == v) | np.isnan(v)).all(axis=1)
    return np.where(bf16, 2, np.where(f16, 1, 0))


_PRECISIONS = ("float32", "float16", "bfloat16")  # indexed by _precision's codes
_RTOL = np.array([ROUNDING_RTOL[p] for p in _PRECISIONS])
_TINY_BY_CODE = np.array([_TINY[p] for p in _PRECISIONS])


SAME, ROUNDING, CONFLICT = 0, 1, 2  # what compare_vectors finds of a pair of rows


def compare_vectors(staged: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two ``(n, dim)`` float arrays compared pair by pair as :data:`ROUNDING_RTOL` says: returns each
    pair's class (``SAME``, ``ROUNDING`` or ``CONFLICT``) and relative difference (0 for equal vectors; NaN where
    a NaN faces a number, which is a conflict). Vectorised, :data:`ROUNDING_BLOCK` rows at a time."""
    n = len(staged)
    kind = np.full(n, SAME, dtype=np.int8)
    rel = np.zeros(n, dtype=np.float64)
    for at in range(0, n, ROUNDING_BLOCK):
        s = np.asarray(staged[at:at + ROUNDING_BLOCK], dtype=np.float32)
        k = np.asarray(kept[at:at + ROUNDING_BLOCK], dtype=np.float32)
        same = (s == k) | (np.isnan(s) & np.isnan(k))
        differs = ~same.all(axis=1)
        if not differs.any():
            continue
        s, k, same = s[differs], k[differs], same[differs]
        code = np.maximum(_precision(s), _precision(k))  # the coarser of the two
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(s.astype(np.float64) - k)).max(axis=1)  # NaN facing a number: NaN
            finite = np.abs(np.where(np.isfinite(s), s, 0)).max(axis=1), np.abs(np.where(np.isfinite(k), k, 0)).max(axis=1)
            r = diff / np.maximum(np.maximum(*finite), _TINY_BY_CODE[code])
        idx = np.nonzero(differs)[0] + at
        rel[idx] = r
        kind[idx] = np.where(r <= _RTOL[code], ROUNDING, CONFLICT)  # NaN is a conflict
    return kind, rel


def _differences(pairs: pl.DataFrame, other: str) -> tuple[int, float, pl.DataFrame]:
    """For rows of ``pairs`` holding a staged ``vector`` and the kept one in column ``other``: the number of
    rounding differences, the largest relative difference among them, and the conflicting rows."""
    if not pairs.height:
        return 0, 0.0, pairs
    if not all(isinstance(pairs.schema[c], pl.Array) for c in ("vector", other)):  # not fixed-size: exact only
        return 0, 0.0, pairs.filter(pl.col("vector") != pl.col(other))
    kind, rel = compare_vectors(pairs.get_column("vector").to_numpy(), pairs.get_column(other).to_numpy())
    rounding = kind == ROUNDING
    top = float(rel[rounding].max()) if rounding.any() else 0.0
    return int(rounding.sum()), top, pairs.filter(pl.Series(kind == CONFLICT))


def _merge_config(final_path: Path, staged_paths: list[Path]) -> tuple[pl.DataFrame | None, dict]:
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
        n, top, bad = _differences(both, "vector_final")
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
            n, top, bad = _differences(cmp, "vector_kept")
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


def _recorded_span(footer: Footer) -> tuple[tuple[int, int], tuple[int, int], dict[int, int]] | None:
    """First key, last key and bucket counts of a staged file as its chunk recorded them, when the file is
    still the one the chunk wrote (its record was adopted: same size and footer) and the record adds up."""
    summary = footer.record
    if summary is None:
        return None
    try:
        first, last = tuple(int(k) for k in summary["first_key"]), tuple(int(k) for k in summary["last_key"])
        counts = {int(b): int(n) for b, n in summary["buckets"].items()}
    except (KeyError, TypeError, ValueError):
        return None
    if len(first) != 2 or len(last) != 2 or first > last or sum(counts.values()) != footer.num_rows \
            or min(counts, default=0) < 0:
        return None
    return first, last, counts


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


def _append_plan(final_path: Path, staged_paths: list[Path],
                 footers: dict[Path, Footer]) -> tuple[list[Footer], dict[int, int], int] | None:
    """How to add ``staged_paths`` to ``final_path`` without decoding vectors, or None when the config needs a
    rewrite. Returns the footers to concatenate in order (the final file's first; none when every staged
    file is already in the final file byte for byte), the bucket counts of the added rows and their number.

    A staged file's keys and bucket counts come from its chunk's record (adopted by ``merge_staging``'s check)
    when the file is still the one the chunk wrote (its rows were sorted by the chunk itself); otherwise they
    are read from it."""
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
        span = _recorded_span(f) or _read_span(f)
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


def _to_arrow(df: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """The frame as Arrow with exactly ``schema``'s types (polars gives large_string); only differing columns cast."""
    table = df.to_arrow()
    cols = []
    for field in schema:
        col = table.column(field.name)
        cols.append(col if col.type == field.type else col.cast(field.type))
    return pa.Table.from_arrays(cols, schema=schema)


def bucket_counts(df: pl.DataFrame | None, path: Path) -> tuple[int, dict[int, int]]:
    if df is None:
        df = pl.read_parquet(path, columns=["bucket"])
    counts = df.get_column("bucket").value_counts()
    return df.height, {int(b): int(n) for b, n in counts.iter_rows()}


class _Outputs:
    """The files one merge writes: each under a temporary name next to its place (the pattern
    ``remove_stale_temps`` clears after a kill), renamed into place together by :meth:`commit` once all of them
    are written, or removed together by :meth:`rollback` (with the directories made for them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.files: dict[Path, Path] = {}  # place -> temporary name
        self.dirs: list[Path] = []  # directories made for new configs

    def temp_for(self, path: Path) -> Path:
        path = Path(path)
        with self._lock:
            if path in self.files:  # an append that fell back to a rewrite: the same temporary
                return self.files[path]
            d = path.parent
            while not d.exists():
                self.dirs.append(d)
                d = d.parent
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)  # a placeholder: the writers put their file there by a rename of their own
            self.files[path] = Path(tmp)
        return Path(tmp)

    def discard(self, path: Path) -> None:
        """Forget (and remove) the temporary of ``path``: nothing will be put in its place."""
        with self._lock:
            tmp = self.files.pop(Path(path), None)
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def place_of(self, path: Path) -> Path:
        """The place a temporary (or the temporary of a temporary) stands for; ``path`` itself otherwise."""
        for place, tmp in self.files.items():
            if Path(path) == tmp or Path(path).name.startswith(f".{tmp.name}."):
                return place
        return Path(path)

    def commit(self, last: Path) -> None:
        """Rename every file into place, ``last`` last."""
        for place, tmp in self.files.items():
            if place != last:
                os.replace(tmp, place)
        if last in self.files:
            os.replace(self.files[last], last)

    def rollback(self) -> None:
        for tmp in self.files.values():
            tmp.unlink(missing_ok=True)
        for d in sorted(set(self.dirs), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass


# -- the stage --------------------------------------------------------------------------------


def merge_staging(cfg: dict, root: Path | None = None, *, append: bool = True) -> dict:
    """Merge every complete staged chunk into ``final/``; write and return ``final/.merged.json``.

    ``append=False`` rewrites every grown file even where appending would do (benchmarks and tests
    compare the two ways with it).
    """
    t0 = time.perf_counter()
    root = Path(root) if root is not None else data_root(cfg)
    split = split_name(cfg)
    final = final_dir(root)
    legacy.refuse_local(root)  # a dataset of the original tool is converted by sniff-qk migrate, never merged into
    remove_stale_temps(final)  # a merge killed mid-write left them; verify_dataset refuses a final/ holding any
    fingerprint = chunk_fingerprint(cfg)
    current_sampling = sampling_settings(cfg)

    chunks, incomplete = scan_chunks(root)
    for name in incomplete:
        log.warning("staging/%s has no manifest (an unfinished or crashed chunk): ignored", name)
    stale = [(d, m) for d, m in chunks if not manifest_fingerprint_matches(m, cfg)]
    if stale:
        lines = [f"  {d}: {describe_config_change(m, cfg)}" for d, m in stale]
        raise MergeError(
            f"staged chunks were produced by a different config than this run (fingerprint {fingerprint}, "
            f"split {split!r}):\n" + "\n".join(lines) +
            "\nDelete those chunk dirs (or rerun them with this config: snakemake <chunk dir>/manifest.json) "
            "and merge again."
        )

    # sampling settings recorded for the split must match this run's unless mixing is allowed
    recorded, recorded_in = recorded_sampling(final, split)
    mixed = None
    if recorded and chunks:
        diff = _sampling_diff(recorded, current_sampling)
        if diff:
            what = ", ".join(f"{k}: recorded {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            if not cfg["output"].get("allow_mixed_sampling"):
                raise MergeError(
                    f"split {split!r} in {recorded_in} was captured with different sampling settings ({what}). "
                    "Appending would mix two samplings in one split. Use the recorded settings, write to another "
                    "split (output.split_name), or set output.allow_mixed_sampling: true to append anyway."
                )
            log.warning("split %r: appending with different sampling settings (%s)", split, what)
            mixed = {"recorded": recorded, "recorded_in": Path(recorded_in).name}

    # staged files per config, all checked before anything is written
    staged: dict[str, list[Path]] = {}
    summaries: dict[Path, dict] = {}  # what each chunk recorded of its files (first/last key, bucket counts)
    for d, m in chunks:
        recorded = m.get("summaries") if isinstance(m.get("summaries"), dict) else {}
        for cfg_name, rel in sorted((m.get("files") or {}).items()):
            p = d / rel
            if not p.is_file():
                raise MergeError(f"{d}/manifest.json lists {rel} but {p} is missing; delete {d} and rerun that chunk")
            staged.setdefault(cfg_name, []).append(p)
            summaries[p] = recorded.get(cfg_name)

    def check(cfg_name: str) -> tuple[pa.Schema, dict[Path, Footer]]:
        """The config's Arrow schema and the footers of its files (read once, used again by the append plan);
        raises when a file is unreadable or its schema differs from the others'."""
        fpath = data_file(final, split, cfg_name)
        found: dict[Path, Footer] = {}
        ref, ref_schema = None, None
        if fpath.is_file():
            try:
                ref = found[fpath] = read_footer(fpath)
                ref_schema = ref.md.schema.to_arrow_schema()
            except Exception as exc:  # noqa: BLE001
                raise _corrupt(fpath, exc) from exc
        for p in staged[cfg_name]:
            try:
                # a file its chunk's record still describes needs no parsing: that record has its rows and layout
                f = found[p] = read_footer(p, parse=False)
                if not f.adopt(summaries.get(p)):
                    f.md  # noqa: B018 - parsed now, so a damaged footer is reported here
                if ref is not None and f.same_layout(ref):
                    continue  # the same Parquet schema and metadata: the same Arrow schema
                s = f.md.schema.to_arrow_schema()
            except Exception as exc:  # noqa: BLE001
                raise MergeError(f"staged file {p} is not readable Parquet ({exc}); delete its chunk dir and rerun it") \
                    from exc
            if ref is None:
                ref, ref_schema = f, s
            elif _schema_key(s) != _schema_key(ref_schema):
                raise MergeError(
                    f"schema mismatch for config {cfg_name!r} of split {split!r}: {p} has {_describe_schema(s)} but "
                    f"{ref.path} has {_describe_schema(ref_schema)}. A split holds one model with one head dimension "
                    "and vector dtype: write these rows to another split (output.split_name) or delete the "
                    "mismatching files and rerun."
                )
        return ref_schema, found

    # every file is checked before anything is written (a few configs at a time: mostly reading footers)
    schemas: dict[str, pa.Schema] = {}
    footers: dict[Path, Footer] = {}
    names = sorted(staged)
    with ThreadPoolExecutor(max_workers=max(1, min(APPEND_WORKERS, len(names))), thread_name_prefix="qk-merge") as pool:
        for cfg_name, (schema, found) in zip(names, pool.map(check, names)):
            schemas[cfg_name] = schema
            footers.update(found)

    # merge config by config. Appends (copying bytes, waiting on the disk) run several at a time; rewrites
    # (polars and pyarrow decode and encode without the GIL) at most MERGE_WORKERS at a time, for memory.
    # Every file goes to a temporary name first (outputs): nothing is renamed into place before all are written
    outputs = _Outputs()

    def append_one(cfg_name: str):
        fpath = data_file(final, split, cfg_name)
        plan = _append_plan(fpath, staged[cfg_name], footers) if append else None
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
            log.info("%s/%s: rewriting instead of appending (%s)", split, cfg_name, exc)
            return None
        return cfg_name, stats, n, counts

    def rewrite_one(cfg_name: str):
        fpath = data_file(final, split, cfg_name)
        merged, stats = _merge_config(fpath, staged[cfg_name])
        if stats["changed"]:
            write_parquet_atomic(_to_arrow(merged, schemas[cfg_name]), outputs.temp_for(fpath))
            stats["method"] = "rewrite"
        else:
            outputs.discard(fpath)  # an append that fell back here may have reserved one
        n, counts = bucket_counts(merged.select("bucket"), fpath) if merged is not None else (0, {})
        return cfg_name, stats, n, counts

    try:
        result = _merge_all(names, append_one, rewrite_one, final, split, chunks, incomplete, fingerprint,
                            current_sampling, mixed, t0)
        atomic_write_json(outputs.temp_for(final / MERGED_NAME), result)
    except BaseException as exc:
        outputs.rollback()
        code = disk_full_errno(exc)
        if code is None:
            raise
        where = exc.path if isinstance(exc, DiskFullError) else getattr(exc, "filename", None) or final
        raise DiskFullError(outputs.place_of(where), code, _full_hint(final, split, staged)) from exc
    outputs.commit(final / MERGED_NAME)
    log.info("merged %d chunks into split %r: %d rows added to %d configs in %.1fs", len(chunks), split,
             result["rows_added_total"], len(result["configs_touched"]), result["merge_s"])
    return result


def _full_hint(final: Path, split: str, staged: dict[str, list[Path]]) -> str:
    """What a merge that found its disk full says after the path: what was kept, the room it needs, the way on."""
    try:
        size = sum(p.stat().st_size for paths in staged.values() for p in paths)
        size += sum(p.stat().st_size for n, p in final_configs(final, split).items() if n in staged)
        need = f" (about {size / 2**20:,.1f} MiB here)"
    except OSError:
        need = ""
    return (f"final/ was left as it was, nothing of this merge was kept. A merge writes the new version of each file "
            f"it grows next to the old one before it replaces any{need}; free space there and run merge_staging again")


def _merge_all(names, append_one, rewrite_one, final: Path, split: str, chunks, incomplete, fingerprint,
               current_sampling, mixed, t0: float) -> dict:
    """Run the appends, then the rewrites, and gather what ``final/.merged.json`` records."""
    with ThreadPoolExecutor(max_workers=max(1, min(APPEND_WORKERS, len(names))), thread_name_prefix="qk-merge") as pool:
        done = dict(zip(names, pool.map(append_one, names)))
    rest = [n for n in names if done[n] is None]
    with ThreadPoolExecutor(max_workers=max(1, min(MERGE_WORKERS, len(rest))), thread_name_prefix="qk-merge") as pool:
        done.update(zip(rest, pool.map(rewrite_one, rest)))

    rows_added: dict[str, int] = {}
    touched: list[str] = []
    methods: dict[str, int] = {"append": 0, "rewrite": 0}
    conflicts: dict[str, dict] = {}
    rounding: dict[str, dict] = {}
    bucket_rows: dict[str, dict[int, int]] = {"q": {}, "k": {}}
    rows_total: dict[str, int] = {}

    def add_counts(cfg_name: str, counts: dict[int, int]) -> None:
        parsed = parse_config_name(cfg_name)
        per = bucket_rows.setdefault(parsed[2] if parsed else "?", {})
        for b, c in counts.items():
            per[b] = per.get(b, 0) + c

    for cfg_name, stats, n, counts in (done[name] for name in names):
        rows_added[cfg_name] = stats["added"]
        if stats["conflicts"]:
            conflicts[cfg_name] = {"count": stats["conflicts"], "examples": stats["conflict_examples"]}
            log.warning("%s/%s: %d staged rows conflict with final rows (final rows kept)", split, cfg_name,
                        stats["conflicts"])
        if stats["rounding"]:
            rounding[cfg_name] = {"count": stats["rounding"], "max_relative_difference": stats["rounding_max"]}
        if stats["changed"]:
            touched.append(cfg_name)
            methods[stats["method"]] += 1
        if n:
            rows_total[cfg_name] = n
            add_counts(cfg_name, counts)
    for cfg_name, fpath in final_configs(final, split).items():
        if cfg_name not in rows_total:
            rows_total[cfg_name], counts = bucket_counts(None, fpath)
            add_counts(cfg_name, counts)

    merge_s = time.perf_counter() - t0
    result = {
        "split": split,
        "merged_at": _now(),
        "config_fingerprint": fingerprint,
        "sampling": current_sampling,
        "mixed_sampling": mixed,
        "configs_touched": touched,
        "methods": methods,
        "rows_added": rows_added,
        "rows_added_total": int(sum(rows_added.values())),
        "rows_total": dict(sorted(rows_total.items())),
        "rows_split_total": int(sum(rows_total.values())),
        "configs": len(rows_total),
        "conflicts": conflicts,
        "conflicts_total": int(sum(c["count"] for c in conflicts.values())),
        # staged rows whose vector differs from the kept one by float rounding only (ROUNDING_RTOL), not counted above
        "rounding_differences": rounding,
        "rounding_differences_total": int(sum(r["count"] for r in rounding.values())),
        "rounding_max_relative_difference": max((r["max_relative_difference"] for r in rounding.values()),
                                                default=0.0),
        "rounding_tolerance": dict(ROUNDING_RTOL),
        "chunks": [
            {
                "chunk": m["chunk"], "example_range": m.get("example_range"), "examples": m.get("examples"),
                "tokens": m.get("tokens"), "rows": int(sum((m.get("rows") or {}).values())),
            }
            for _, m in chunks
        ],
        "incomplete_chunks": incomplete,
        "run": _run_summary([m for _, m in chunks]),
        "buckets": {kind: {str(b): n for b, n in sorted(v.items())} for kind, v in sorted(bucket_rows.items()) if v},
        "merge_s": round(merge_s, 3),
    }
    if rounding:
        log.info("split %r: %d staged rows in %d configs differ from the rows kept by float rounding only (at most "
                 "%.2g relative; .merged.json: rounding_differences): not conflicts, the kept rows stay", split,
                 result["rounding_differences_total"], len(rounding), result["rounding_max_relative_difference"])
    return result


def _run_summary(manifests: list[dict]) -> dict | None:
    if not manifests:
        return None
    first = manifests[0]
    t = [m.get("timings") or {} for m in manifests]
    forward = sum(x.get("forward_s") or 0 for x in t)
    tokens = sum(m.get("tokens") or 0 for m in manifests)
    return {
        "model": first.get("model"),
        "dataset": first.get("dataset"),
        "sampling": first.get("sampling"),
        "chunk_size": first.get("chunk_size"),
        "devices": sorted({str(m.get("device")) for m in manifests}),
        "versions": first.get("versions"),
        "timings": {
            "chunks": len(manifests),
            "examples": sum(m.get("examples") or 0 for m in manifests),
            "tokens": tokens,
            "computed_tokens": sum(m.get("computed_tokens") or 0 for m in manifests),
            "load_s": round(sum(x.get("load_s") or 0 for x in t), 3),
            "forward_s": round(forward, 3),
            "total_s": round(sum(x.get("total_s") or 0 for x in t), 3),
            "tokens_per_s": round(tokens / forward, 1) if forward > 0 else None,
        },
    }
