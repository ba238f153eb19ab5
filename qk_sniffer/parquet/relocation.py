"""Moving a file's row groups to another place in a file: every absolute file offset in their footer
entries shifted, ordinals renumbered.

Row groups are moved either by walking every field of their footer entries (:func:`_moved_row_groups`)
or, when where the offsets lie was recorded as the file was written (:func:`offset_map`, kept in its
chunk's manifest), by patching just those few values (:func:`_patched_row_groups`). Encrypted files are
refused.
"""

from __future__ import annotations

from collections.abc import Callable

from .footer import (
    CC_COLUMN_INDEX,
    CC_CRYPTO,
    CC_ENCRYPTED_META,
    CC_FILE_OFFSET,
    CC_META,
    CC_OFFSET_INDEX,
    CM_BLOOM,
    CM_DATA_PAGE,
    CM_DICT_PAGE,
    CM_INDEX_PAGE,
    FMD_ENCRYPTION,
    FMD_ROW_GROUPS,
    FMD_SIGNING_KEY,
    RG_COLUMNS,
    RG_FILE_OFFSET,
    RG_ORDINAL,
    Footer,
)
from .thrift import FooterError, _copy_struct, _list_head, _skip, _uvarint, _zigzag, copy_struct


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
