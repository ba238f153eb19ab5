"""Property tests of the footer codec and of concatenation (qk_sniffer.parquet), on files written by pyarrow with
many writer options, by polars and by DuckDB; and DuckDB reading a data file written the way the dataset is."""

from __future__ import annotations

import tempfile
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qk_sniffer.chunk.writer import row_schema
from qk_sniffer.parquet import (
    Footer,
    FooterError,
    concat_files,
    copy_struct,
    read_footer,
    write_parquet_atomic,
)

VECTOR_LEAF = "vector.list.element"


def _table(seed: int, first_example: int, rows: int, dim: int, half: bool, null_every: int) -> pa.Table:
    """``rows`` rows of the dataset schema, keys increasing from ``first_example``; the nullable columns
    (``sliding_window``, ``token_str``) hold a null every ``null_every`` rows (0: none)."""
    rng = np.random.default_rng(seed)
    i = np.arange(rows)
    nulls = (i % null_every == 0) if null_every else np.zeros(rows, bool)
    vec = rng.standard_normal(rows * dim).astype(np.float16 if half else np.float32)
    cols = [
        pa.array(rng.integers(0, 5, rows), pa.int32()),
        pa.array(first_example + i // 3, pa.int64()),
        pa.array(i % 3, pa.int32()),
        pa.FixedSizeListArray.from_arrays(pa.array(vec), dim),
        pa.array(np.where(nulls, 0, 4096), pa.int32(), mask=nulls),
        pa.array([None if n else f"tok{k % 11}" for k, n in zip(i, nulls)], pa.string()),
        pa.repeat(pa.scalar(2, pa.int16()), rows),
        pa.repeat(pa.scalar(0, pa.int16()), rows),
        pa.repeat(pa.scalar("k"), rows),
    ]
    return pa.Table.from_arrays(cols, schema=row_schema(dim, "float16" if half else "float32", token_strings=True))


def _chunk_offsets(md: pq.FileMetaData) -> list[list[tuple]]:
    """Per row group, each column chunk's (data page, dictionary page) offsets as pyarrow reads them."""
    return [[(c.data_page_offset, c.dictionary_page_offset if c.has_dictionary_page else None)
             for c in (rg.column(j) for j in range(rg.num_columns))]
            for rg in (md.row_group(i) for i in range(md.num_row_groups))]


def assert_codec_reads_like_pyarrow(path: Path) -> Footer:
    """The codec's footer of ``path`` agrees with ``pyarrow.parquet.read_metadata``; returns it."""
    footer = read_footer(path)
    md = pq.read_metadata(path)
    assert footer.size == path.stat().st_size
    assert footer.num_rows == md.num_rows
    assert footer.md.num_row_groups == md.num_row_groups
    assert [footer.md.row_group(i).num_rows for i in range(md.num_row_groups)] == \
        [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    assert _chunk_offsets(footer.md) == _chunk_offsets(md)
    assert copy_struct(footer.raw) == footer.raw  # walked and written back: the same bytes
    return footer


def assert_concatenation(paths: list[Path], dest: Path) -> None:
    """``concat_files`` of ``paths`` reads back as their tables one after another, each source's column chunks
    moved by exactly the bytes before them (an offset under 4 means "not set" and stays)."""
    rows = concat_files(paths, dest)
    expected = pa.concat_tables([pq.read_table(p) for p in paths])
    assert rows == expected.num_rows == pq.read_metadata(dest).num_rows
    assert pq.read_table(dest).equals(expected)
    got, shift = _chunk_offsets(pq.read_metadata(dest)), 0
    moved = []
    for p in paths:
        f = read_footer(p)
        moved += [[tuple(o + shift if o is not None and o >= 4 else o for o in chunk) for chunk in rg]
                  for rg in _chunk_offsets(f.md)]
        shift += f.body_end - 4
    assert got == moved


writer_options = st.fixed_dictionaries({
    "row_group_size": st.sampled_from([None, 1, 7, 64, 1000]),
    "compression": st.sampled_from(["none", "snappy", "zstd", "gzip"]),
    "use_dictionary": st.booleans(),
    "data_page_size": st.sampled_from([None, 64, 1024]),
    "write_statistics": st.booleans(),
    "byte_stream_split": st.booleans(),
    "data_page_version": st.sampled_from(["1.0", "2.0"]),
    "write_page_index": st.booleans(),
})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, 400)), min_size=1, max_size=3),
    dim=st.sampled_from([1, 3, 16, 64]),
    half=st.booleans(),
    null_every=st.sampled_from([0, 1, 2, 7]),
    options=writer_options,
    seed=st.integers(0, 2**16),
)
def test_codec_reads_every_pyarrow_footer_and_concatenation_equals_concat_tables(rows, dim, half, null_every, options,
                                                                                 seed):
    options = dict(options)
    if options.pop("byte_stream_split"):
        options["use_byte_stream_split"] = [VECTOR_LEAF]
        options["use_dictionary"] = [n for n in ("bucket", "token_str", "kind") if options["use_dictionary"]]
    options = {k: v for k, v in options.items() if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        paths, first = [], 0
        for i, n in enumerate(rows):
            path = Path(tmp) / f"part{i}.parquet"
            pq.write_table(_table(seed + i, first, n, dim, half, null_every), path, **options)
            first += n
            assert_codec_reads_like_pyarrow(path)
            paths.append(path)
        assert_concatenation(paths, Path(tmp) / "all.parquet")


# -- footers of other writers ------------------------------------------------------------------


def _other_writers(table: pa.Table, tmp_path: Path, name: str) -> dict[str, Path]:
    """``table`` written by polars (with and without statistics) and by DuckDB."""
    out = {}
    for stats in (True, False):
        out[f"polars, statistics={stats}"] = tmp_path / f"{name}-polars-{stats}.parquet"
        pl.from_arrow(table).write_parquet(out[f"polars, statistics={stats}"], statistics=stats, row_group_size=2048)
    out["duckdb"] = tmp_path / f"{name}-duckdb.parquet"
    con = duckdb.connect()
    con.register("rows", table)
    con.execute(f"COPY (SELECT * FROM rows) TO '{out['duckdb']}' (FORMAT parquet, ROW_GROUP_SIZE 2048)")
    con.close()
    return out


WRITERS = ["polars, statistics=True", "polars, statistics=False", "duckdb"]


@pytest.mark.parametrize("writer", WRITERS)
def test_codec_reads_footers_of_other_writers_like_pyarrow(tmp_path, writer):
    first = _other_writers(_table(1, 0, 5000, 16, False, 5), tmp_path, "a")[writer]
    second = _other_writers(_table(2, 1667, 3000, 16, False, 5), tmp_path, "b")[writer]
    footer = assert_codec_reads_like_pyarrow(first)
    assert footer.md.num_row_groups > 1
    assert_codec_reads_like_pyarrow(second)
    # two files of the same writer concatenate like two of ours (ordinals renumbered where there are some)
    rows = concat_files([first, second], tmp_path / "both.parquet")
    assert rows == 8000
    assert pq.read_table(tmp_path / "both.parquet").equals(pa.concat_tables([pq.read_table(first), pq.read_table(second)]))
    assert_codec_reads_like_pyarrow(tmp_path / "both.parquet")


@pytest.mark.parametrize("writer", WRITERS)
def test_other_writers_files_do_not_share_our_layout_and_concatenation_refuses_them(tmp_path, writer):
    """The merge appends only files of one layout (``Footer.same_layout``); another writer's files differ in
    their Parquet schema or key-value metadata, so the merge rewrites instead, and ``concat_files`` refuses them."""
    ours = tmp_path / "ours.parquet"
    write_parquet_atomic(_table(3, 0, 300, 16, False, 5), ours)
    theirs = _other_writers(_table(4, 100, 300, 16, False, 5), tmp_path, "b")[writer]
    assert not read_footer(ours).same_layout(read_footer(theirs))
    for order in ([ours, theirs], [theirs, ours]):
        with pytest.raises(FooterError, match="differ in schema or metadata"):
            concat_files(order, tmp_path / "mixed.parquet")
    assert not (tmp_path / "mixed.parquet").exists()


# -- DuckDB reads the dataset's files ------------------------------------------------------------


@pytest.mark.parametrize("half", [False, True], ids=["float32 (BYTE_STREAM_SPLIT)", "float16"])
def test_duckdb_reads_a_dataset_file_like_pyarrow(tmp_path, half):
    """README.md promises DuckDB reads the dataset: a file written as sniff-chunk and merge write them
    (:func:`write_parquet_atomic`) reads back in DuckDB with the same rows and vectors as in pyarrow."""
    path = tmp_path / "data.parquet"
    write_parquet_atomic(_table(5, 0, 900, 32, half, 4), path)
    encodings = pq.read_metadata(path).row_group(0).column(3).encodings
    assert ("BYTE_STREAM_SPLIT" in encodings) == (not half)
    expected = pq.read_table(path)
    con = duckdb.connect()
    got = con.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_table()
    con.close()
    assert got.num_rows == expected.num_rows == 900
    assert got.column_names == expected.column_names
    for name in expected.column_names:
        if name == "vector":
            continue
        assert got.column(name).to_pylist() == expected.column(name).to_pylist(), name
    vectors = np.asarray(got.column("vector").to_pylist(), np.float32)
    assert vectors.shape == (900, 32)
    assert np.array_equal(vectors, expected.column("vector").combine_chunks().flatten().to_numpy().reshape(900, 32)
                          .astype(np.float32))
