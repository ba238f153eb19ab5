"""Moving a file's row groups to another place in a file: every absolute file offset in their footer
entries shifted, ordinals renumbered.

Row groups are moved by walking every field of their footer entries (:func:`_moved_row_groups`);
encrypted files are refused.
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


def _moved_row_groups(footer: Footer, delta: int, first_ordinal: int, out: bytearray) -> int:
    """Append ``footer``'s row groups to ``out`` with every absolute offset moved by ``delta`` and ordinals
    from ``first_ordinal`` on; returns how many there were."""
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
