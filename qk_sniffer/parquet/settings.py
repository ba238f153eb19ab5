"""How every data file of the dataset is written: the Parquet settings, and the row key files are sorted by.

Every data file, staged or final, is written by :func:`write_parquet_atomic` with the same settings,
sorted by ``(example_id, position)`` (:data:`KEYS`), so that a merge can append one file's row groups
to another's (:mod:`.concat`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..layout import atomic_output

KEYS = ["example_id", "position"]
ROW_GROUP_BYTES = 64 << 20  # uncompressed bytes per row group: small enough for the Hub viewer, large enough to scan


def row_group_rows(schema: pa.Schema) -> int:
    vec = schema.field("vector").type
    per_row = 32 + vec.list_size * vec.value_type.bit_width // 8
    return int(min(1 << 20, max(8192, ROW_GROUP_BYTES // per_row)))


def byte_stream_split_columns(schema: pa.Schema) -> list[str]:
    """The vector's leaf column when it holds float32, else nothing.

    BYTE_STREAM_SPLIT stores the 1st, 2nd, 3rd and 4th bytes of all the floats of a page one after
    another, so zstd sees the exponent bytes together (which vary little) and, for vectors of a
    model run in bf16 and stored as float32, two streams of zero bytes. The common Parquet readers
    decode it for float32 (pyarrow, and so ``datasets``; polars; DuckDB). float16 vectors are
    Parquet fixed-length byte arrays, whose BYTE_STREAM_SPLIT came only with parquet-format 2.11
    and which DuckDB does not decode: they stay PLAIN, so no reader of a published dataset is shut out.
    """
    value = schema.field("vector").type.value_type
    return ["vector.list.element"] if pa.types.is_float32(value) else []


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """zstd, vectors byte-stream-split (see :func:`byte_stream_split_columns`), content-defined chunking (Xet
    dedups unchanged pages), sorted-by metadata; temp file + rename."""
    names = table.schema.names
    sorting = [pq.SortingColumn(names.index(k)) for k in KEYS]
    with atomic_output(path) as fh:
        pq.write_table(
            table, fh, compression="zstd", use_content_defined_chunking=True, write_page_checksum=True,
            row_group_size=row_group_rows(table.schema), sorting_columns=sorting,
            use_dictionary=[n for n in names if n != "vector"],  # float vectors never repeat
            use_byte_stream_split=byte_stream_split_columns(table.schema),
            write_statistics=[n for n in names if n != "vector"],
        )
