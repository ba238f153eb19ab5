"""Parquet files of the dataset: how they are written, and appending whole files without re-encoding.

Every data file, staged or final, is written by :func:`write_parquet_atomic` with the same settings,
sorted by ``(example_id, position)``. When a merge only adds rows whose keys all come after the
ones already in a file (new examples appended to a split, the usual case), the result is the old
file's bytes followed by each new file's row groups, copied byte for byte, under one new footer
(:func:`concat_files`): nothing is decoded or re-compressed, and the old file's pages are
unchanged (the Hub's Xet storage uploads only the new bytes).

pyarrow has no API to copy row groups between files, so the footer (Thrift compact protocol,
parquet-format's ``FileMetaData``) is decoded and re-encoded here with a small generic codec; only
absolute file offsets, row counts and row group ordinals are rewritten, every other field is
carried over as it was read. Encrypted files are refused.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .layout import atomic_output

KEYS = ["example_id", "position"]
ROW_GROUP_BYTES = 64 << 20  # uncompressed bytes per row group: small enough for the Hub viewer, large enough to scan
MAGIC = b"PAR1"


# -- writing ----------------------------------------------------------------------------------


def row_group_rows(schema: pa.Schema) -> int:
    vec = schema.field("vector").type
    per_row = 32 + vec.list_size * vec.value_type.bit_width // 8
    return int(min(1 << 20, max(8192, ROW_GROUP_BYTES // per_row)))


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """zstd, content-defined chunking (Xet dedups unchanged pages), sorted-by metadata; temp file + rename."""
    names = table.schema.names
    sorting = [pq.SortingColumn(names.index(k)) for k in KEYS]
    with atomic_output(path) as fh:
        pq.write_table(
            table, fh, compression="zstd", use_content_defined_chunking=True, write_page_checksum=True,
            row_group_size=row_group_rows(table.schema), sorting_columns=sorting,
            use_dictionary=[n for n in names if n != "vector"],  # float vectors never repeat
            write_statistics=[n for n in names if n != "vector"],
        )


# -- Thrift compact protocol (just enough to carry a footer through unchanged) -----------------

# type ids of the compact protocol
STOP, TRUE, FALSE, I8, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class FooterError(ValueError):
    """A file's footer cannot be carried over (not Parquet, encrypted, or malformed)."""


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        if self.pos >= len(self.buf):
            raise FooterError("footer ends early")
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 70:
                raise FooterError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise FooterError("footer ends early")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def value(self, ttype: int):
        if ttype in (TRUE, FALSE):  # a bool inside a list, set or map is one byte
            return self.byte()
        if ttype == I8:
            return self.byte()
        if ttype in (I16, I32, I64):
            return self.zigzag()
        if ttype == DOUBLE:
            return self.take(8)
        if ttype == BINARY:
            return self.take(self.varint())
        if ttype in (LIST, SET):
            head = self.byte()
            size, etype = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return etype, [self.value(etype) for _ in range(size)]
        if ttype == MAP:
            size = self.varint()
            if size == 0:
                return 0, 0, []
            kv = self.byte()
            kt, vt = kv >> 4, kv & 0x0F
            return kt, vt, [(self.value(kt), self.value(vt)) for _ in range(size)]
        if ttype == STRUCT:
            return self.struct()
        raise FooterError(f"unknown Thrift type {ttype}")

    def struct(self) -> list[list]:
        """Fields as ``[field_id, type, value]`` in the order read (bool fields carry their value in the type)."""
        fields, last = [], 0
        while True:
            head = self.byte()
            ttype = head & 0x0F
            if ttype == STOP:
                return fields
            delta = head >> 4
            fid = last + delta if delta else self.zigzag()
            fields.append([fid, ttype, None if ttype in (TRUE, FALSE) else self.value(ttype)])
            last = fid


def _varint(n: int, out: bytearray) -> None:
    while True:
        if n < 0x80:
            out.append(n)
            return
        out.append((n & 0x7F) | 0x80)
        n >>= 7


def _zigzag(n: int, out: bytearray) -> None:
    _varint((n << 1) ^ (n >> 63), out)


def _write_value(ttype: int, value, out: bytearray) -> None:
    if ttype in (TRUE, FALSE, I8):
        out.append(value)
    elif ttype in (I16, I32, I64):
        _zigzag(value, out)
    elif ttype == DOUBLE:
        out += value
    elif ttype == BINARY:
        _varint(len(value), out)
        out += value
    elif ttype in (LIST, SET):
        etype, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | etype)
        else:
            out.append(0xF0 | etype)
            _varint(len(items), out)
        for item in items:
            _write_value(etype, item, out)
    elif ttype == MAP:
        kt, vt, items = value
        _varint(len(items), out)
        if items:
            out.append(kt << 4 | vt)
            for k, v in items:
                _write_value(kt, k, out)
                _write_value(vt, v, out)
    elif ttype == STRUCT:
        _write_struct(value, out)
    else:
        raise FooterError(f"unknown Thrift type {ttype}")


def _write_struct(fields: list[list], out: bytearray) -> None:
    last = 0
    for fid, ttype, value in fields:
        delta = fid - last
        if 0 < delta <= 15:
            out.append(delta << 4 | ttype)
        else:
            out.append(ttype)
            _zigzag(fid, out)
        if ttype not in (TRUE, FALSE):
            _write_value(ttype, value, out)
        last = fid
    out.append(STOP)


def decode_struct(buf: bytes) -> list[list]:
    r = _Reader(buf)
    out = r.struct()
    if r.pos != len(buf):
        raise FooterError(f"{len(buf) - r.pos} bytes after the footer's end")
    return out


def encode_struct(fields: list[list]) -> bytes:
    out = bytearray()
    _write_struct(fields, out)
    return bytes(out)


def _field(fields: list[list], fid: int):
    for f in fields:
        if f[0] == fid:
            return f
    return None


# -- footers and appending --------------------------------------------------------------------

# parquet-format field ids (parquet.thrift)
FMD_SCHEMA, FMD_NUM_ROWS, FMD_ROW_GROUPS, FMD_KV = 2, 3, 4, 5
RG_COLUMNS, RG_NUM_ROWS, RG_FILE_OFFSET, RG_ORDINAL = 1, 3, 5, 7
CC_FILE_OFFSET, CC_META, CC_OFFSET_INDEX, CC_COLUMN_INDEX, CC_CRYPTO, CC_ENCRYPTED_META = 2, 3, 4, 6, 8, 9
CM_DATA_PAGE, CM_INDEX_PAGE, CM_DICT_PAGE, CM_BLOOM = 9, 10, 11, 14


@dataclass
class Footer:
    path: Path
    raw: bytes                # the encoded FileMetaData (decoded here only when row groups are carried over)
    body_end: int             # where the footer starts: bytes [4, body_end) are the row groups (and page indexes)
    md: pq.FileMetaData       # the same footer as pyarrow parsed it

    @property
    def num_rows(self) -> int:
        return self.md.num_rows

    def layout_key(self) -> tuple:
        """What two files must share for their row groups to live in one file: the Parquet columns and the
        key-value metadata (pyarrow's ``ARROW:schema`` among them)."""
        schema = self.md.schema
        columns = tuple((c.path, c.physical_type, str(c.logical_type), c.max_definition_level, c.max_repetition_level)
                        for c in (schema.column(i) for i in range(len(schema))))
        return columns, tuple(sorted((self.md.metadata or {}).items()))


def read_footer(path: Path) -> Footer:
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
    try:
        md = pq.ParquetFile(path).metadata  # parsed in C++: schema, row groups and row count
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged footer
        raise FooterError(f"{path}: unreadable footer ({exc})") from exc
    return Footer(path, raw, body_end, md)


def _shift(fields: list[list] | None, ids: tuple[int, ...], delta: int, path: Path, body_end: int) -> None:
    for f in fields or ():
        if f[0] in ids and f[2] >= 4:  # 0 (and anything inside the magic) means "not set" for some writers
            if f[2] >= body_end:
                raise FooterError(f"{path}: an offset in its footer points past its row groups")
            f[2] += delta


def _row_groups(footer: Footer, meta: list[list], delta: int) -> list[list[list]]:
    """The row groups of ``meta`` (``footer``'s decoded metadata) with every absolute offset moved by ``delta``."""
    for f in meta:
        if f[0] in (8, 9):  # encryption_algorithm, footer_signing_key_metadata
            raise FooterError(f"{footer.path} is encrypted")
    rgs = _field(meta, FMD_ROW_GROUPS)
    groups = rgs[2][1] if rgs else []
    for rg in groups:
        _shift(rg, (RG_FILE_OFFSET,), delta, footer.path, footer.body_end)
        cols = _field(rg, RG_COLUMNS)
        for cc in cols[2][1] if cols else []:
            if _field(cc, CC_CRYPTO) or _field(cc, CC_ENCRYPTED_META):
                raise FooterError(f"{footer.path} has encrypted columns")
            _shift(cc, (CC_FILE_OFFSET, CC_OFFSET_INDEX, CC_COLUMN_INDEX), delta, footer.path, footer.body_end)
            meta_field = _field(cc, CC_META)
            _shift(meta_field[2] if meta_field else None, (CM_DATA_PAGE, CM_INDEX_PAGE, CM_DICT_PAGE, CM_BLOOM),
                   delta, footer.path, footer.body_end)
    return groups


def _copy(src: Path, start: int, stop: int, dst) -> None:
    """Bytes ``[start, stop)`` of ``src`` onto the end of the open file ``dst`` (in the kernel where it can)."""
    dst.flush()
    with open(src, "rb") as fh:
        fin, fout = fh.fileno(), dst.fileno()
        offset, left = start, stop - start
        use_kernel = hasattr(os, "copy_file_range")
        while left > 0:
            n = 0
            if use_kernel:
                try:
                    n = os.copy_file_range(fin, fout, min(left, 1 << 30), offset)
                except OSError:
                    use_kernel = False
            if not use_kernel:
                data = os.pread(fin, min(left, 16 << 20), offset)
                n = os.write(fout, data) if data else 0
            if n <= 0:
                raise OSError(f"{src}: could not copy bytes {offset}..{stop} (file changed while it was read?)")
            offset += n
            left -= n


def concat_files(sources: list[Path], dest: Path, footers: list[Footer] | None = None) -> int:
    """Write ``dest`` (atomically) holding every row group of ``sources`` in order, copied byte for byte.

    All sources must have the same :meth:`Footer.layout_key` (the caller checks; a mismatch raises
    :class:`FooterError`). The new footer is the first source's with the row groups of all of them.
    ``dest`` may be one of the sources. Returns the row count.
    """
    footers = footers or [read_footer(p) for p in sources]
    if not footers:
        raise ValueError("nothing to concatenate")
    key = footers[0].layout_key()
    for f in footers[1:]:
        if f.layout_key() != key:
            raise FooterError(f"{f.path} and {footers[0].path} differ in schema or metadata")
    groups, pos, meta = [], 4, None
    for f in footers:
        decoded = decode_struct(f.raw)
        meta = meta or decoded  # the new footer: the first file's, with every file's row groups
        groups += _row_groups(f, decoded, pos - 4)
        pos += f.body_end - 4
    for i, rg in enumerate(groups):
        ordinal = _field(rg, RG_ORDINAL)
        if ordinal is not None:
            if i > 0x7FFF:  # an i16: past it, leave the ordinal out (it is optional)
                rg.remove(ordinal)
            else:
                ordinal[2] = i
    total = sum(f.num_rows for f in footers)
    _field(meta, FMD_NUM_ROWS)[2] = total
    rgs = _field(meta, FMD_ROW_GROUPS)
    rgs[2] = (STRUCT, groups)
    footer = encode_struct(meta)
    with atomic_output(dest) as out:
        out.write(MAGIC)
        for f in footers:
            _copy(f.path, 4, f.body_end, out)
        out.write(footer + struct.pack("<I", len(footer)) + MAGIC)
    return total
