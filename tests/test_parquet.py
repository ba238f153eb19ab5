"""Footer codec and byte-for-byte concatenation of Parquet files (qk_sniffer.parquet)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qk_sniffer.chunk.writer import row_schema
from qk_sniffer.parquet import (
    FMD_ROW_GROUPS,
    STRUCT,
    Footer,
    FooterError,
    _moved_row_groups,
    _replace,
    _write_list_head,
    concat_files,
    copy_struct,
    read_footer,
    write_parquet_atomic,
)

WRITE_OPTIONS = {
    "defaults": {},
    "dataset": None,  # write_parquet_atomic: zstd, content-defined chunking, page checksums, sorting metadata
    "page index, small row groups": {"write_page_index": True, "row_group_size": 700, "compression": "snappy"},
    "no statistics or dictionary": {"write_statistics": False, "use_dictionary": False, "compression": "none"},
}


def _table(rng, first_example: int, examples: int, dim: int = 16, *, half: bool = False, tokens: bool = True):
    ex = np.repeat(np.arange(first_example, first_example + examples), 40)
    pos = np.tile(np.arange(40, dtype=np.int32), examples)
    n = len(ex)
    vec = rng.standard_normal(n * dim).astype(np.float16 if half else np.float32)
    schema = row_schema(dim, "float16" if half else "float32", token_strings=tokens)
    cols = [pa.array(pos % 7, pa.int32()), pa.array(ex, pa.int64()), pa.array(pos),
            pa.FixedSizeListArray.from_arrays(pa.array(vec), dim), pa.nulls(n, pa.int32())]
    if tokens:
        cols.append(pa.array([None if i % 5 == 0 else f"tok{i % 97}" for i in range(n)], pa.string()))
    cols += [pa.repeat(pa.scalar(3, pa.int16()), n), pa.repeat(pa.scalar(1, pa.int16()), n),
             pa.repeat(pa.scalar("q"), n)]
    return pa.Table.from_arrays(cols, schema=schema)


def _write(table: pa.Table, path, options):
    if options is None:
        write_parquet_atomic(table, path)
    else:
        pq.write_table(table, path, **options)
    return path


@pytest.mark.parametrize("options", list(WRITE_OPTIONS.values()), ids=list(WRITE_OPTIONS))
@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_footer_round_trips_and_concatenation_equals_concat_tables(tmp_path, options, half):
    rng = np.random.default_rng(7)
    tables = [_table(rng, 0, 60, half=half), _table(rng, 60, 25, half=half), _table(rng, 85, 90, half=half)]
    paths = [_write(t, tmp_path / f"part{i}.parquet", options) for i, t in enumerate(tables)]
    for p in paths:  # walking a footer and writing it back gives its exact bytes
        f = read_footer(p)
        raw = p.read_bytes()[f.body_end:-8]
        assert f.raw == raw and copy_struct(raw) == raw
        groups = bytearray()  # row groups moved by nothing: rewritten field by field, the same bytes come out
        assert _moved_row_groups(f, 0, 0, groups) == f.md.num_row_groups
        assert len(groups) > 100 and bytes(groups) in raw
    out = tmp_path / "out.parquet"
    assert concat_files(paths, out) == sum(t.num_rows for t in tables)
    want = pa.concat_tables(tables)
    pf = pq.ParquetFile(out, page_checksum_verification=True)
    assert pf.read().equals(want)
    assert pf.schema_arrow.equals(tables[0].schema)
    md = pf.metadata
    parts = [pq.ParquetFile(p).metadata for p in paths]
    assert md.num_rows == want.num_rows and md.num_row_groups == sum(m.num_row_groups for m in parts)
    i = 0
    for path, part in zip(paths, parts):  # every row group carries over, in order, with its statistics
        for j in range(part.num_row_groups):
            got, src = md.row_group(i), part.row_group(j)
            assert got.num_rows == src.num_rows and got.total_byte_size == src.total_byte_size
            for c in range(src.num_columns):
                assert got.column(c).statistics == src.column(c).statistics
            assert pf.read_row_group(i).equals(pq.ParquetFile(path).read_row_group(j))
            i += 1
    assert pl.read_parquet(out).equals(pl.from_arrow(want))
    # a read that skips row groups by their statistics lands on the right bytes
    assert pq.read_table(out, filters=[("example_id", ">=", 85)]).equals(tables[2])


def test_concatenating_onto_one_of_the_sources_in_place(tmp_path):
    rng = np.random.default_rng(1)
    a, b = _table(rng, 0, 30), _table(rng, 30, 30)
    pa_, pb = _write(a, tmp_path / "a.parquet", None), _write(b, tmp_path / "b.parquet", None)
    head = pa_.read_bytes()
    body_end = read_footer(pa_).body_end
    concat_files([pa_, pb], pa_)
    assert pq.read_table(pa_).equals(pa.concat_tables([a, b]))
    assert pa_.read_bytes()[:body_end] == head[:body_end]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_files_that_cannot_share_a_footer_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    a = _write(_table(rng, 0, 10), tmp_path / "a.parquet", None)
    other_dim = _write(_table(rng, 10, 10, dim=8), tmp_path / "b.parquet", None)
    no_tokens = _write(_table(rng, 10, 10, tokens=False), tmp_path / "c.parquet", None)
    for bad in (other_dim, no_tokens):
        with pytest.raises(FooterError, match="differ in schema or metadata"):
            concat_files([a, bad], tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    text = tmp_path / "x.parquet"
    text.write_bytes(b"not parquet at all, just some text")
    with pytest.raises(FooterError, match="not a Parquet file"):
        read_footer(text)
    truncated = tmp_path / "t.parquet"
    truncated.write_bytes(a.read_bytes()[:-3])
    with pytest.raises(FooterError):
        read_footer(truncated)
    damaged = tmp_path / "d.parquet"
    data = bytearray(a.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    data[-8 - footer_len:-8] = b"\xff" * footer_len
    damaged.write_bytes(bytes(data))
    with pytest.raises(FooterError):
        read_footer(damaged)


def _footer_with_row_groups(footer: Footer, groups: bytes, count: int | None = None) -> bytes:
    """``footer``'s bytes with its row group list replaced by ``count`` encoded row groups (as many as it had)."""
    head = bytearray()
    _write_list_head(footer.md.num_row_groups if count is None else count, STRUCT, head)
    return copy_struct(footer.raw, {FMD_ROW_GROUPS: _replace(bytes(head) + groups)})


def test_ordinals_past_an_i16_are_left_out_and_the_footer_stays_valid(tmp_path):
    table = _table(np.random.default_rng(3), 0, 50)
    path = tmp_path / "a.parquet"
    pl.from_arrow(table).write_parquet(path, row_group_size=700)  # polars writes row group ordinals (pyarrow does not)
    table = pq.read_table(path)
    f = read_footer(path)
    groups, same = bytearray(), bytearray()
    n = _moved_row_groups(f, 0, 0x8000, groups)  # ordinals from 32768 on: every one is left out
    _moved_row_groups(f, 0, 0, same)
    assert n == f.md.num_row_groups > 2 and len(groups) == len(same) - 2 * n  # field header and value, 1 byte each
    footer = _footer_with_row_groups(f, bytes(groups), n)
    out = tmp_path / "b.parquet"
    out.write_bytes(path.read_bytes()[:f.body_end] + footer + len(footer).to_bytes(4, "little") + b"PAR1")
    assert pq.read_table(out).equals(table)


def _vector_encodings(path) -> set[str]:
    md = pq.ParquetFile(path).metadata
    col = md.schema.names.index("element")  # the vector's leaf: the only column named so
    return {e for g in range(md.num_row_groups) for e in md.row_group(g).column(col).encodings}


@pytest.mark.parametrize("half", [False, True], ids=["float32", "float16"])
def test_float32_vectors_are_byte_stream_split_and_read_back_bit_for_bit(tmp_path, half):
    table = _table(np.random.default_rng(4), 0, 200, dim=64, half=half)
    path = _write(table, tmp_path / "a.parquet", None)
    encodings = _vector_encodings(path)
    # float16 is a fixed-length byte array in Parquet: not every reader decodes it split, so it stays PLAIN
    assert ("BYTE_STREAM_SPLIT" in encodings) != half and ("PLAIN" in encodings) == half
    got = pq.read_table(path)
    assert got.equals(table)
    vec = table.column("vector").combine_chunks().values
    assert np.array_equal(got.column("vector").combine_chunks().values.to_numpy().view(np.uint8),
                          vec.to_numpy().view(np.uint8))
    if not half:  # polars has no float16
        assert pl.read_parquet(path).equals(pl.from_arrow(table))


def test_split_vectors_of_a_bf16_model_take_less_room(tmp_path):
    """A model run in bf16 gives float32 vectors whose low two bytes are zero: split into byte streams, zstd
    drops them whole (PLAIN leaves them interleaved with the high bytes)."""
    import torch

    rng = np.random.default_rng(5)
    table = _table(rng, 0, 400, dim=128, tokens=False)
    vec = torch.from_numpy(rng.standard_normal(table.num_rows * 128, dtype=np.float32)).bfloat16().float().numpy()
    table = table.set_column(table.schema.get_field_index("vector"), table.schema.field("vector"),
                             pa.FixedSizeListArray.from_arrays(pa.array(vec), 128))
    split = _write(table, tmp_path / "split.parquet", None)
    names = table.schema.names
    plain = _write(table, tmp_path / "plain.parquet", {  # the same settings, vectors PLAIN
        "compression": "zstd", "use_content_defined_chunking": True, "write_page_checksum": True,
        "use_dictionary": [n for n in names if n != "vector"], "write_statistics": [n for n in names if n != "vector"]})
    assert _vector_encodings(plain) == {"PLAIN", "RLE"}
    assert split.stat().st_size < 0.85 * plain.stat().st_size
    assert pq.read_table(split).equals(pq.read_table(plain))


def test_a_file_with_plain_vectors_and_one_with_split_vectors_concatenate(tmp_path):
    """Final files published before vectors were split take appended split row groups: each column chunk
    names its own encoding."""
    rng = np.random.default_rng(6)
    old, new = _table(rng, 0, 50), _table(rng, 50, 50)
    names = old.schema.names
    a = _write(old, tmp_path / "a.parquet", {"compression": "zstd", "use_dictionary": [n for n in names if n != "vector"]})
    b = _write(new, tmp_path / "b.parquet", None)
    assert read_footer(a).layout_key == read_footer(b).layout_key
    out = tmp_path / "out.parquet"
    concat_files([a, b], out)
    assert pq.ParquetFile(out, page_checksum_verification=True).read().equals(pa.concat_tables([old, new]))
    assert pl.read_parquet(out).equals(pl.from_arrow(pa.concat_tables([old, new])))
    assert _vector_encodings(out) == _vector_encodings(a) | _vector_encodings(b)


@pytest.mark.parametrize("options", list(WRITE_OPTIONS.values()), ids=list(WRITE_OPTIONS))
def test_moved_row_groups_shift_every_offset_by_the_delta(tmp_path, options):
    """Row groups moved by deltas that lengthen the offsets' varints read back (through pyarrow, not the codec)
    with every column chunk offset moved by exactly the delta, ordinals from the one given."""
    path = _write(_table(np.random.default_rng(8), 0, 120), tmp_path / "a.parquet", options)
    footer = read_footer(path)
    before = [[(c.data_page_offset, c.dictionary_page_offset if c.has_dictionary_page else None)
               for c in (rg.column(j) for j in range(rg.num_columns))]
              for rg in (footer.md.row_group(i) for i in range(footer.md.num_row_groups))]
    for delta in (0, 1, 1000, 1 << 21, 1 << 40):
        out = bytearray()
        assert _moved_row_groups(footer, delta, 5, out) == footer.md.num_row_groups
        moved = Footer(path, _footer_with_row_groups(footer, bytes(out)), footer.body_end + delta)
        got = [[(c.data_page_offset, c.dictionary_page_offset if c.has_dictionary_page else None)
                for c in (rg.column(j) for j in range(rg.num_columns))]
               for rg in (moved.md.row_group(i) for i in range(moved.md.num_row_groups))]
        assert got == [[tuple(o + delta if o is not None and o >= 4 else o for o in chunk) for chunk in rg]
                       for rg in before]
