"""Concatenating whole Parquet files without re-encoding: the merge's append path.

pyarrow has no API to copy row groups between files, so the result is the first file's bytes
followed by each other file's row groups, copied byte for byte, under one new footer: the first
file's, with the others' row groups (moved by :mod:`.relocation`) added after its own. Nothing is
decoded or re-compressed, the first file's row groups are not rewritten at all (the cost of an
append does not grow with the row groups already in the final file, beyond one skim of its footer),
and the first file's pages are unchanged (the Hub's Xet storage uploads only the new bytes).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..layout import atomic_output
from .footer import FMD_NUM_ROWS, FMD_ROW_GROUPS, MAGIC, Footer, read_footer
from .relocation import _moved_row_groups, _replace, _walk
from .thrift import STRUCT, FooterError, _list_head, _skip, _write_list_head, _zigzag


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
