"""Parquet files of the dataset: how they are written, and appending whole files without re-encoding.

Every data file, staged or final, is written by :func:`write_parquet_atomic` with the same settings,
sorted by ``(example_id, position)`` (:mod:`.settings`). When a merge only adds rows whose keys all come
after the ones already in a file (new examples appended to a split, the usual case), the result is the
old file's bytes followed by each new file's row groups, copied byte for byte, under one new footer
(:func:`concat_files`, :mod:`.concat`): nothing is decoded or re-compressed, and the old file's pages
are unchanged (the Hub's Xet storage uploads only the new bytes).

pyarrow has no API to copy row groups between files, so the footer (Thrift compact protocol,
parquet-format's ``FileMetaData``) is walked and written back by a small hand-written codec
(:mod:`.thrift`); only absolute file offsets, row counts and row group ordinals are rewritten
(:mod:`.relocation`), every other byte is carried over as it was read. Encrypted files are refused.
A file's footer is read by :func:`read_footer` (:mod:`.footer`).

The modules, each depending only on those listed before it: :mod:`.settings`, :mod:`.thrift`,
:mod:`.footer`, :mod:`.relocation`, :mod:`.concat`.
"""

from .concat import concat_files
from .footer import FMD_ROW_GROUPS, MAGIC, Footer, read_footer
from .relocation import _moved_row_groups, _replace
from .settings import KEYS, ROW_GROUP_BYTES, byte_stream_split_columns, row_group_rows, write_parquet_atomic
from .thrift import STRUCT, FooterError, _write_list_head, copy_struct

__all__ = [
    "FMD_ROW_GROUPS",
    "KEYS",
    "MAGIC",
    "ROW_GROUP_BYTES",
    "STRUCT",
    "Footer",
    "FooterError",
    "_moved_row_groups",
    "_replace",
    "_write_list_head",
    "byte_stream_split_columns",
    "concat_files",
    "copy_struct",
    "read_footer",
    "row_group_rows",
    "write_parquet_atomic",
]
