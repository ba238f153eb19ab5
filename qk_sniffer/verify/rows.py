"""The row checks of one final data file, streamed a record batch at a time: keys ``(example_id, position)``
unique and sorted; ``layer``/``head``/``kind`` constant and equal to the path's; positions >= 0; no null
vector; ``sliding_window`` constant; every bucket the one the recorded sampler gives its position; and, for a
bounded random subset of rows (the same on every run), the frozen sampler selects the row.

:func:`check_rows` streams a file (it runs in a worker thread and changes nothing shared); :func:`report_rows`
turns what it counted into problem lines.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..layout import CONFIG_RE
from ..parquet import KEYS
from ..sampling import SamplerSpec, bucket_of, keep_probability
from .context import REBUILD, VerifyContext
from .report import NAMED, named
from .samplers import describe_spec, sampler_u

BATCH_ROWS = 65536
# read column chunks through a small buffer instead of pre-buffering the whole file: memory stays at about one
# record batch (pyarrow's default pre-buffers every row group it is asked for)
STREAM = {"pre_buffer": False, "buffer_size": 1 << 20}


@dataclass
class FileRows:
    """What streaming one file's rows found."""

    rows: int = 0
    sampled_rows: int = 0
    problem: str | None = None
    stats: RowStats | None = None


class RowStats:
    """Counters a streaming pass over one file accumulates (vectorised per record batch)."""

    def __init__(self) -> None:
        self.duplicates = 0
        self.duplicate_example: tuple[int, int] | None = None
        self.decreasing = 0
        self.decreasing_example: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.mismatch: dict[str, tuple[int, object]] = {}
        self.windows: set = set()
        self.negative = 0
        self.null_vectors = 0
        self.null_values = 0
        self.bad_bucket = 0
        self.bad_bucket_example: tuple[int, int, int, int] | None = None
        self.sampled = 0
        self.unselected = 0
        self.unselected_examples: list[tuple[int, int]] = []

    def keys(self, ex: np.ndarray, pos: np.ndarray, prev: tuple[int, int] | None) -> tuple[int, int] | None:
        """Count equal and decreasing neighbour keys (the previous batch's last key included)."""
        if not len(ex):
            return prev
        if prev is not None:
            ex = np.concatenate([[prev[0]], ex])
            pos = np.concatenate([[prev[1]], pos])
        dex, dpos = np.diff(ex), np.diff(pos)
        same = dex == 0
        dup = np.nonzero(same & (dpos == 0))[0]
        dec = np.nonzero((dex < 0) | (same & (dpos < 0)))[0]
        if len(dup):
            self.duplicates += len(dup)
            if self.duplicate_example is None:
                self.duplicate_example = (int(ex[dup[0] + 1]), int(pos[dup[0] + 1]))
        if len(dec):
            self.decreasing += len(dec)
            if self.decreasing_example is None:
                i = dec[0]
                self.decreasing_example = ((int(ex[i]), int(pos[i])), (int(ex[i + 1]), int(pos[i + 1])))
        return int(ex[-1]), int(pos[-1])

    def constant(self, col: str, values: pa.Array, want: pa.Scalar) -> None:
        eq = pc.equal(values, want)
        bad = len(values) - int(pc.sum(eq).as_py() or 0)  # nulls count as mismatches
        if bad:
            n, first = self.mismatch.get(col, (0, None))
            if first is None:
                wrong = values.filter(pc.invert(pc.fill_null(eq, False)))
                first = wrong[0].as_py() if len(wrong) else None
            self.mismatch[col] = (n + bad, first)

    def window(self, values: pa.Array) -> None:
        if len(self.windows) > NAMED:
            return
        self.windows |= set(pc.unique(values).to_pylist())


def check_rows(ctx: VerifyContext, name: str, path: Path, specs: list[SamplerSpec] | None) -> FileRows:
    """Stream one file's rows; runs in a worker thread and changes nothing shared."""
    # page CRCs are verified where the writer stored them; without them zstd decodes damaged bytes silently
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True, **STREAM)
    except Exception as exc:  # noqa: BLE001 - read a moment ago; changed since
        return FileRows(problem=f"is not readable Parquet ({type(exc).__name__}: {exc}); {REBUILD}")
    with pf:
        return _stream_rows(ctx, name, path, pf, specs)


def _stream_rows(ctx: VerifyContext, name: str, path: Path, pf: pq.ParquetFile,
                 specs: list[SamplerSpec] | None) -> FileRows:
    """One pass over the open file's batches, counting into a :class:`RowStats`; a page that does not decode
    makes the result a problem instead."""
    layer_s, head_s, kind = CONFIG_RE.match(name).groups()
    layer, head = int(layer_s), int(head_s)
    n = pf.metadata.num_rows
    out = FileRows(rows=n)
    # the rows whose sampling decision is recomputed: a seeded random subset, the same on every run
    if ctx.sample_rows is None or n <= ctx.sample_rows:
        sample = np.arange(n, dtype=np.int64)
    else:
        rng = np.random.default_rng(zlib.crc32(ctx.rel(path).encode()))
        sample = np.sort(rng.choice(n, size=ctx.sample_rows, replace=False)).astype(np.int64)
    st = RowStats()
    prev: tuple[int, int] | None = None
    start = 0
    columns = [c for c in pf.schema_arrow.names if c != "token_str"]
    try:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            m = batch.num_rows
            ex = batch.column("example_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            pos = batch.column("position").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
            prev = st.keys(ex, pos, prev)
            st.constant("layer", batch.column("layer"), pa.scalar(layer, pa.int16()))
            st.constant("head", batch.column("head"), pa.scalar(head, pa.int16()))
            st.constant("kind", batch.column("kind"), pa.scalar(kind, pa.string()))
            st.window(batch.column("sliding_window"))
            if m and int(pos.min()) < 0:
                st.negative += int((pos < 0).sum())
            vec = batch.column("vector")
            st.null_vectors += vec.null_count
            st.null_values += vec.flatten().null_count
            if specs is not None and m:
                bucket = batch.column("bucket").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                good = np.zeros(m, dtype=bool)
                expected_first = None
                for spec in specs:
                    want = bucket_of(np.maximum(pos, 0), spec.type, spec.min_bucket_size)
                    good |= want == bucket
                    expected_first = want if expected_first is None else expected_first
                bad = np.nonzero(~good)[0]
                if len(bad):
                    st.bad_bucket += len(bad)
                    if st.bad_bucket_example is None:
                        i = bad[0]
                        st.bad_bucket_example = (int(ex[i]), int(pos[i]), int(bucket[i]), int(expected_first[i]))
                lo, hi = np.searchsorted(sample, [start, start + m])
                local = sample[lo:hi] - start
                if len(local):
                    out.sampled_rows += len(local)
                    sel = np.zeros(len(local), dtype=bool)
                    sp, se = np.maximum(pos[local], 0), ex[local]
                    for spec in specs:
                        p = keep_probability(bucket_of(sp, spec.type, spec.min_bucket_size), spec.type,
                                             spec.base_rate, spec.min_bucket_size)
                        sel |= sampler_u(spec, se, layer, head, kind, sp) < p
                    miss = np.nonzero(~sel)[0]
                    st.sampled += len(local)
                    st.unselected += len(miss)
                    room = max(0, NAMED - len(st.unselected_examples))
                    st.unselected_examples += [(int(se[i]), int(sp[i])) for i in miss[:room]]
            start += m
    except Exception as exc:  # noqa: BLE001 - a page that does not decode is a damaged file
        out.problem = f"cannot be decoded after {start:,} of {n:,} rows ({type(exc).__name__}: {exc}); {REBUILD}"
        return out
    out.stats = st
    return out


def report_rows(ctx: VerifyContext, name: str, path: Path, st: RowStats, specs: list[SamplerSpec] | None) -> None:
    """Report what :func:`check_rows` counted in the file ``path`` of config ``name``."""
    layer_s, head_s, kind = CONFIG_RE.match(name).groups()
    if st.duplicates or st.decreasing:
        dup = st.duplicates
        if st.decreasing:
            try:
                uniq = pl.scan_parquet(path).select(pl.struct(KEYS).n_unique()).collect().item()
                dup = pl.scan_parquet(path).select(pl.len()).collect().item() - uniq
            except Exception:  # noqa: BLE001 - the streaming pass already read it; keep its count
                pass
            a, b = st.decreasing_example
            ctx.problem(path, f"rows are not sorted by (example_id, position): {st.decreasing:,} key(s) "
                              f"smaller than the one before, first {b} after {a}; final files are sorted by "
                              f"merge: {REBUILD}")
        if dup:
            ex = f", e.g. {st.duplicate_example}" if st.duplicate_example else ""
            ctx.problem(path, f"{dup:,} duplicate (example_id, position) key(s){ex}; keys are unique in a "
                              f"final file: {REBUILD}")
    for col, want in (("layer", int(layer_s)), ("head", int(head_s)), ("kind", kind)):
        bad, value = st.mismatch.get(col, (0, None))
        if bad:
            ctx.problem(path, f"column {col} holds {value!r} in {bad:,} row(s) but the path says {want!r} "
                              f"({name}): rows of another config were written here; {REBUILD}")
    if st.negative:
        ctx.problem(path, f"{st.negative:,} row(s) have a negative position; {REBUILD}")
    if st.null_vectors or st.null_values:
        ctx.problem(path, f"{st.null_vectors:,} null vector(s) and {st.null_values:,} null value(s) inside "
                          f"vectors; {REBUILD}")
    if len(st.windows) > 1:
        ctx.problem(path, f"sliding_window is not constant ({named(sorted(st.windows, key=str))}); one file "
                          f"holds one layer: {REBUILD}")
    if specs is None:
        return
    desc = " or ".join(f"({describe_spec(s)})" for s in specs)
    if st.bad_bucket:
        e, p, got, want = st.bad_bucket_example
        ctx.problem(path, f"{st.bad_bucket:,} row(s) have a bucket that the recorded sampler {desc} does not "
                          f"give their position, e.g. example_id {e} position {p}: bucket {got}, expected "
                          f"{want}; the file was edited or captured with other settings: {REBUILD}")
    if st.unselected:
        ctx.problem(path, f"{st.unselected:,} of {st.sampled:,} checked row(s) would not be selected by the "
                          f"recorded sampler {desc}, e.g. (example_id, position) "
                          f"{named(st.unselected_examples)}: they come from a capture with other sampling "
                          f"settings or the file is corrupt; {REBUILD} (rows appended on purpose with other "
                          f"settings are recorded by merge with output.allow_mixed_sampling, then render-readme)")
