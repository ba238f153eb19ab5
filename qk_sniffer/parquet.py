"""Parquet files of the dataset: how they are written, and appending whole files without re-encoding.

Every data file, staged or final, is written by :func:`write_parquet_atomic` with the same settings,
sorted by ``(example_id, position)``. When a merge only adds rows whose keys all come after the
ones already in a file (new examples appended to a split, the usual case), the result is the old
file's bytes followed by each new file's row groups, copied byte for byte, under one new footer
(:func:`concat_files`): nothing is decoded or re-compressed, and the old file's pages are
unchanged (the Hub's Xet storage uploads only the new bytes).

pyarrow has no API to copy row groups between files, so the footer (Thrift compact protocol,
parquet-format's ``FileMetaData``) is walked and written back here by a small hand-written codec;
only absolute file offsets, row counts and row group ordinals are rewritten, every other byte is
carried over as it was read, and the first file's row groups are not rewritten at all (the cost
of an append does not grow with the row groups already in the final file, beyond one skim of its
footer). Encrypted files are refused. Where a file's offsets lie in its footer can be recorded
when it is written (:func:`offset_map`, kept in its chunk's manifest); moving its row groups then
patches those few values instead of walking the footer.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import QkSnifferError
from .layout import atomic_output

KEYS = ["example_id", "position"]
ROW_GROUP_BYTES = 64 << 20  # uncompressed bytes per row group: small enough for the Hub viewer, large enough to scan
MAGIC = b"PAR1"


# -- writing ----------------------------------------------------------------------------------


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


def summarize(table: pa.Table, path: Path) -> dict:
    """What a merge needs to know of the sorted ``table`` just written to ``path``, so that it need not read the
    file again: its first and last keys and bucket counts, and the file's identity (size and footer digest).
    sniff-chunk records it in its manifest; a merge uses it only for a file that still matches it."""
    footer = read_footer(path)
    buckets = table.column("bucket").to_numpy()
    counts = np.bincount(buckets) if len(buckets) and buckets.min() >= 0 else np.zeros(0, np.int64)
    key = [table.column(k) for k in KEYS]
    return {
        "rows": table.num_rows,
        "bytes": footer.size,
        "footer_sha256": footer.digest,
        "first_key": [int(c[0].as_py()) for c in key] if table.num_rows else None,
        "last_key": [int(c[-1].as_py()) for c in key] if table.num_rows else None,
        "buckets": {str(b): int(n) for b, n in enumerate(counts.tolist()) if n},
        "row_group_offsets": offset_map(footer),
        "layout": footer.layout,
    }


def matches_summary(footer: Footer, summary) -> bool:
    """Whether ``footer``'s file is the very file ``summary`` (from :func:`summarize`) was made of: the same size
    and footer bytes. (That the record's contents are right for those bytes is what ``verify`` checks.)"""
    return (isinstance(summary, dict) and summary.get("bytes") == footer.size
            and summary.get("footer_sha256") == footer.digest)


# -- Thrift compact protocol (just enough to carry a footer over) --------------------------------
#
# A footer is walked once and written back as it was read, field by field, except for the few
# fields a concatenation changes (absolute offsets, row counts, ordinals); nothing is decoded into
# Python objects. The first file's row groups are copied as they are: only the appended files' are
# rewritten.

# type ids of the compact protocol
STOP, TRUE, FALSE, I8, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)


class FooterError(QkSnifferError, ValueError):
    """A file's footer cannot be carried over (not Parquet, encrypted, or malformed)."""


def _uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift > 70:
            raise FooterError("varint too long")


def _varint(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(n: int) -> bytearray:
    out = bytearray()
    _varint((n << 1) ^ (n >> 63), out)
    return out


def _list_head(buf: bytes, pos: int) -> tuple[int, int, int]:
    """Size, element type and where the elements begin, for the list (or set) header at ``pos``."""
    head = buf[pos]
    size, etype = head >> 4, head & 0x0F
    if size == 15:
        size, pos = _uvarint(buf, pos + 1)
        return size, etype, pos
    return size, etype, pos + 1


def _write_list_head(size: int, etype: int, out: bytearray) -> None:
    if size < 15:
        out.append(size << 4 | etype)
    else:
        out.append(0xF0 | etype)
        _varint(size, out)


_VARINTS = frozenset((I16, I32, I64))
_EMPTY = frozenset((TRUE, FALSE))  # a bool field is all in its header


def _skip(buf: bytes, pos: int, ttype: int, element: bool = False) -> int:
    """Where the value of type ``ttype`` at ``pos`` ends (a bool is a byte inside a container, nothing in a field)."""
    if ttype in (I16, I32, I64):
        while buf[pos] >= 0x80:
            pos += 1
        return pos + 1
    if ttype == BINARY:
        n, pos = _uvarint(buf, pos)
        return pos + n
    if ttype == STRUCT:
        while True:
            head = buf[pos]
            pos += 1
            if head == STOP:
                return pos
            if not head >> 4:  # a field id of its own
                _, pos = _uvarint(buf, pos)
            ftype = head & 0x0F
            if ftype in _VARINTS:  # most fields of a footer: skipped here rather than in a call
                while buf[pos] >= 0x80:
                    pos += 1
                pos += 1
            elif ftype not in _EMPTY:
                pos = _skip(buf, pos, ftype)
    if ttype in (TRUE, FALSE):
        return pos + 1 if element else pos
    if ttype == I8:
        return pos + 1
    if ttype == DOUBLE:
        return pos + 8
    if ttype in (LIST, SET):
        size, etype, pos = _list_head(buf, pos)
        if etype in _VARINTS:  # encodings, and lists of counts: skipped here rather than in a call each
            for _ in range(size):
                while buf[pos] >= 0x80:
                    pos += 1
                pos += 1
            return pos
        for _ in range(size):
            pos = _skip(buf, pos, etype, True)
        return pos
    if ttype == MAP:
        size, pos = _uvarint(buf, pos)
        if size:
            kt, vt = buf[pos] >> 4, buf[pos] & 0x0F
            pos += 1
            for _ in range(size):
                pos = _skip(buf, _skip(buf, pos, kt, True), vt, True)
        return pos
    raise FooterError(f"unknown Thrift type {ttype}")


def _copy_struct(buf: bytes, pos: int, edits: dict, out: bytearray) -> int:
    """Write the struct at ``pos`` to ``out`` as it was read, except where ``edits`` says; returns where it ends.

    ``edits[field id]`` is a dict of edits for a struct field (or for each struct of a list field), or a
    function ``(buf, start, type) -> (new value bytes or None to leave the field out, end of the old value)``.
    """
    last_in = last_out = 0
    while True:
        head = buf[pos]
        pos += 1
        ttype = head & 0x0F
        if ttype == STOP:
            out.append(STOP)
            return pos
        if head >> 4:
            fid = last_in + (head >> 4)
        else:
            raw, pos = _uvarint(buf, pos)
            fid = (raw >> 1) ^ -(raw & 1)
        last_in = fid
        edit = edits.get(fid)
        value = None
        if edit is None:
            end = _skip(buf, pos, ttype)
            value, pos = buf[pos:end], end
        elif not isinstance(edit, dict):
            value, pos = edit(buf, pos, ttype)
            if value is None:
                continue
        delta = fid - last_out
        if 0 < delta <= 15:
            out.append(delta << 4 | ttype)
        else:
            out.append(ttype)
            out += _zigzag(fid)
        last_out = fid
        if value is not None:
            out += value
        elif ttype == STRUCT:
            pos = _copy_struct(buf, pos, edit, out)
        elif ttype == LIST:
            size, etype, pos = _list_head(buf, pos)
            if etype != STRUCT:
                raise FooterError(f"field {fid}: a list of structs was expected")
            _write_list_head(size, etype, out)
            for _ in range(size):
                pos = _copy_struct(buf, pos, edit, out)
        else:
            raise FooterError(f"field {fid}: a struct or list was expected, found type {ttype}")


def copy_struct(raw: bytes, edits: dict | None = None) -> bytes:
    """``raw`` (one encoded struct) walked and written back with ``edits`` (none: the same bytes)."""
    out = bytearray()
    try:
        end = _copy_struct(raw, 0, edits or {}, out)
    except IndexError as exc:
        raise FooterError("footer ends early") from exc
    if end != len(raw):
        raise FooterError(f"{len(raw) - end} bytes after the footer's end")
    return bytes(out)


# -- footers and appending --------------------------------------------------------------------

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
    # the chunk's record of this very file (:func:`summarize`), once :meth:`adopt` found the file unchanged: its
    # row count, layout and offset map are then taken from it, and the footer need not be parsed at all
    record: dict | None = None

    @cached_property
    def md(self) -> pq.FileMetaData:
        """The footer as pyarrow parses it (from ``raw``: the file is not read again)."""
        try:
            return pq.ParquetFile(pa.BufferReader(MAGIC + self.raw + struct.pack("<I", len(self.raw)) + MAGIC)).metadata
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged footer
            raise FooterError(f"{self.path}: unreadable footer ({exc})") from exc

    @property
    def num_rows(self) -> int:
        return self.record["rows"] if self.record is not None else self.md.num_rows

    @property
    def offsets(self) -> dict | None:
        """Where its row groups and their absolute offsets lie in ``raw`` (:func:`offset_map`), as recorded:
        moving the row groups then patches those bytes instead of walking the footer."""
        return self.record.get("row_group_offsets") if self.record is not None else None

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

    @cached_property
    def layout(self) -> str:
        """A digest of :attr:`layout_key` (the record's, for an adopted file: same bytes, same layout). Two files
        with equal digests share their layout; unequal digests are compared by :attr:`layout_key` (a digest
        written by another pyarrow version may differ for the same layout)."""
        if self.record is not None and isinstance(self.record.get("layout"), str):
            return self.record["layout"]
        return hashlib.sha256(repr(self.layout_key).encode()).hexdigest()

    def same_layout(self, other: Footer) -> bool:
        return self.layout == other.layout or self.layout_key == other.layout_key

    def adopt(self, summary) -> bool:
        """Take ``summary`` (the record :func:`summarize` made when the file was written) as this file's, if the
        file is still that very file: the same size and footer bytes (SHA-256). Returns whether it did."""
        if not matches_summary(self, summary) or not isinstance(summary.get("rows"), int):
            return False
        self.record = summary
        return True


def read_footer(path: Path, parse: bool = True) -> Footer:
    """``path``'s footer; a footer pyarrow cannot parse raises :class:`FooterError` here, or with ``parse=False``
    wherever it is first needed (a file whose record is adopted needs none)."""
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
    if parse:
        footer.md  # noqa: B018 - parsed now, so a damaged footer is reported here
    return footer


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


def _replace(value: bytes) -> Callable:
    """An edit that puts ``value`` in place of a field's value."""
    return lambda buf, pos, ttype: (value, _skip(buf, pos, ttype))


def _refuse(why: str) -> Callable:
    def edit(buf, pos, ttype):
        raise FooterError(why)
    return edit


def _shift(footer: Footer, delta: int) -> Callable:
    """An edit that moves an absolute file offset of ``footer``'s file by ``delta``."""
    def edit(buf, pos, ttype):
        raw, end = _uvarint(buf, pos)
        offset = (raw >> 1) ^ -(raw & 1)
        if offset < 4:  # 0 (and anything inside the magic) means "not set" for some writers
            return buf[pos:end], end
        if offset >= footer.body_end:
            raise FooterError(f"{footer.path}: an offset in its footer points past its row groups")
        return _zigzag(offset + delta), end
    return edit


def _row_group_edits(footer: Footer, offset: Callable, ordinal: Callable) -> dict:
    """Edits of one row group: ``offset`` for each absolute file offset in it, ``ordinal`` for its ordinal."""
    encrypted = _refuse(f"{footer.path} is encrypted")
    column = {CC_FILE_OFFSET: offset, CC_OFFSET_INDEX: offset, CC_COLUMN_INDEX: offset, CC_CRYPTO: encrypted,
              CC_ENCRYPTED_META: encrypted, CC_META: {k: offset for k in (CM_DATA_PAGE, CM_INDEX_PAGE, CM_DICT_PAGE,
                                                                           CM_BLOOM)}}
    return {RG_COLUMNS: column, RG_FILE_OFFSET: offset, RG_ORDINAL: ordinal}


def offset_map(footer: Footer) -> dict | None:
    """Where ``footer``'s row groups lie in its bytes and which of those bytes are absolute file offsets:
    ``{"row_groups": [start, end, count], "offsets": [start, end, start, end, ...]}``, positions in
    ``footer.raw``. With it, the row groups are moved by patching those few values (:func:`_patched_row_groups`)
    instead of walking every field of every column chunk. None for row groups with ordinals (pyarrow writes
    none) or encryption: those are moved by walking."""
    spans: list[int] = []
    found: list[int] = []

    def note(buf, pos, ttype):
        raw, end = _uvarint(buf, pos)
        if (raw >> 1) ^ -(raw & 1) >= 4:  # the offsets _shift moves
            spans.extend((pos, end))
        return buf[pos:end], end

    def row_groups(buf, pos, ttype):
        size, _, start = _list_head(buf, pos)
        end = start
        edits = _row_group_edits(footer, note, _refuse("row group ordinals"))
        for _ in range(size):
            end = _copy_struct(buf, end, edits, bytearray())
        found.extend((start, end, size))
        return buf[pos:end], end

    try:
        _walk(footer, {FMD_ROW_GROUPS: row_groups})
    except FooterError:
        return None
    return {"row_groups": found, "offsets": spans}


def _patched_row_groups(footer: Footer, delta: int) -> tuple[bytes, int] | None:
    """``footer``'s row groups with every absolute offset moved by ``delta``, patched where ``footer.offsets``
    says, and their number; None when that map does not fit the footer (the caller walks it instead)."""
    try:
        (start, end, count), spans = footer.offsets["row_groups"], footer.offsets["offsets"]
        raw, pos, out = footer.raw, start, bytearray()
        if not 0 < start <= end <= len(raw) or len(spans) % 2:
            return None
        if "md" in footer.__dict__ and count != footer.md.num_row_groups:  # checked where the footer was parsed
            return None
        for s, e in zip(spans[::2], spans[1::2]):
            value, stop = _uvarint(raw, s)
            offset = (value >> 1) ^ -(value & 1)
            if not (pos <= s and stop == e <= end and 4 <= offset < footer.body_end):
                return None
            out += raw[pos:s]
            out += _zigzag(offset + delta)
            pos = e
        out += raw[pos:end]
    except (KeyError, TypeError, ValueError, IndexError):  # FooterError is a ValueError
        return None
    return bytes(out), count


def _moved_row_groups(footer: Footer, delta: int, first_ordinal: int, out: bytearray) -> int:
    """Append ``footer``'s row groups to ``out`` with every absolute offset moved by ``delta`` and ordinals
    from ``first_ordinal`` on; returns how many there were."""
    if footer.offsets is not None:
        patched = _patched_row_groups(footer, delta)  # a footer with an offset map has no ordinals
        if patched is not None:
            out += patched[0]
            return patched[1]
    shift = _shift(footer, delta)
    count = 0

    def row_groups(buf, pos, ttype):
        nonlocal count
        size, etype, pos = _list_head(buf, pos)
        for _ in range(size):
            ordinal = first_ordinal + count
            # an i16: past it, leave the ordinal out (it is optional)
            edits = _row_group_edits(footer, shift, _replace(_zigzag(ordinal) if ordinal <= 0x7FFF else None))
            pos = _copy_struct(buf, pos, edits, out)
            count += 1
        return b"", pos

    _walk(footer, {FMD_ROW_GROUPS: row_groups})
    return count


def _walk(footer: Footer, edits: dict) -> bytes:
    """``footer`` written back with ``edits``; an encrypted footer is refused."""
    encrypted = _refuse(f"{footer.path} is encrypted")
    try:
        return copy_struct(footer.raw, {FMD_ENCRYPTION: encrypted, FMD_SIGNING_KEY: encrypted, **edits})
    except FooterError as exc:
        if str(footer.path) in str(exc):
            raise
        raise FooterError(f"{footer.path}: {exc}") from exc


def concat_files(sources: list[Path], dest: Path, footers: list[Footer] | None = None) -> int:
    """Write ``dest`` (atomically) holding every row group of ``sources`` in order, copied byte for byte.

    All sources must have the same layout (``Footer.same_layout``; the caller checks, a mismatch raises
    :class:`FooterError`). The new footer is the first source's with the row groups of all of them
    (the first source's as they were, the others' with their offsets and ordinals moved). ``dest``
    may be one of the sources. Returns the row count.
    """
    footers = footers or [read_footer(p) for p in sources]
    if not footers:
        raise ValueError("nothing to concatenate")
    first = footers[0]
    for f in footers[1:]:
        if not f.same_layout(first):
            raise FooterError(f"{f.path} and {first.path} differ in schema or metadata")
    groups, count, pos = bytearray(), first.md.num_row_groups, first.body_end
    for f in footers[1:]:
        count += _moved_row_groups(f, pos - 4, count, groups)
        pos += f.body_end - 4
    total = sum(f.num_rows for f in footers)

    def row_groups(buf, at, ttype):  # the first file's row groups as they are, then the others'
        size, etype, start = _list_head(buf, at)
        end = _skip(buf, at, ttype)
        if size != first.md.num_row_groups or etype != STRUCT:
            raise FooterError(f"{first.path}: its footer's row groups do not match its metadata")
        head = bytearray()
        _write_list_head(count, STRUCT, head)
        return bytes(head) + buf[start:end] + groups, end

    footer = _walk(first, {FMD_NUM_ROWS: _replace(_zigzag(total)), FMD_ROW_GROUPS: row_groups})
    with atomic_output(dest) as out:
        out.write(MAGIC)
        for f in footers:
            _copy(f.path, 4, f.body_end, out)
        out.write(footer + struct.pack("<I", len(footer)) + MAGIC)
    return total
