"""A Parquet file's footer as the merge uses it: read from the file's end, parsed by pyarrow when needed;
and the parquet-format field ids (``parquet.thrift``) that moving row groups edits.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .thrift import FooterError

MAGIC = b"PAR1"

# parquet-format field ids (parquet.thrift)
FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_ENCRYPTION, FMD_SIGNING_KEY = 3, 4, 8, 9
RG_COLUMNS, RG_FILE_OFFSET, RG_ORDINAL = 1, 5, 7
CC_FILE_OFFSET, CC_META, CC_OFFSET_INDEX, CC_COLUMN_INDEX, CC_CRYPTO, CC_ENCRYPTED_META = 2, 3, 4, 6, 8, 9
CM_DATA_PAGE, CM_INDEX_PAGE, CM_DICT_PAGE, CM_BLOOM = 9, 10, 11, 14


@dataclass
class Footer:
    path: Path
    raw: bytes                # the encoded FileMetaData (walked only when row groups are carried over)
    body_end: int             # where the footer starts: bytes [4, body_end) are the row groups (and page indexes)

    @cached_property
    def md(self) -> pq.FileMetaData:
        """The footer as pyarrow parses it (from ``raw``: the file is not read again)."""
        try:
            return pq.ParquetFile(pa.BufferReader(MAGIC + self.raw + struct.pack("<I", len(self.raw)) + MAGIC)).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged footer
            raise FooterError(f"{self.path}: unreadable footer ({exc})") from exc

    @property
    def num_rows(self) -> int:
        return self.md.num_rows

    @property
    def size(self) -> int:
        return self.body_end + len(self.raw) + 8

    @cached_property
    def digest(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @cached_property
    def layout_key(self) -> tuple:
        """What two files must share for their row groups to live in one file: the Parquet columns and the
        key-value metadata (pyarrow's ``ARROW:schema`` among them)."""
        schema = self.md.schema
        columns = tuple((c.path, c.physical_type, str(c.logical_type), c.max_definition_level, c.max_repetition_level)
                        for c in (schema.column(i) for i in range(len(schema))))
        return columns, tuple(sorted((self.md.metadata or {}).items()))

    def same_layout(self, other: Footer) -> bool:
        return self.layout_key == other.layout_key


def read_footer(path: Path) -> Footer:
    """``path``'s footer, parsed: a footer pyarrow cannot parse raises :class:`FooterError` here."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
        if size < 12 or head != MAGIC:
            raise FooterError(f"{path} is not a Parquet file (or its footer is encrypted)")
        fh.seek(size - 8)
        tail = fh.read(8)
        (length,) = struct.unpack("<I", tail[:4])
        if tail[4:] != MAGIC:
            raise FooterError(f"{path} is not a plain Parquet file (encrypted footer or truncated)")
        body_end = size - 8 - length
        if body_end < 4:
            raise FooterError(f"{path}: footer length {length} does not fit the file")
        fh.seek(body_end)
        raw = fh.read(length)
    footer = Footer(path, raw, body_end)
    footer.md  # noqa: B018 - parsed now, so a damaged footer is reported here
    return footer
