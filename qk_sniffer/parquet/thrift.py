"""Thrift compact protocol, just enough to carry a Parquet footer over.

A footer is walked once and written back as it was read, field by field, except for the few
fields a concatenation changes (absolute offsets, row counts, ordinals); nothing is decoded into
Python objects. The first file's row groups are copied as they are: only the appended files' are
rewritten (:mod:`.relocation`, :mod:`.concat`).
"""

from __future__ import annotations

from ..errors import QkSnifferError

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
