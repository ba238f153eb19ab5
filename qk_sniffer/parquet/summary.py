"""The record a chunk keeps of each data file it wrote, so that a merge need not read the file again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .footer import read_footer
from .relocation import offset_map
from .settings import KEYS


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
