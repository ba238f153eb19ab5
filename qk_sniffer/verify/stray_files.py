"""The stray-file check: no temporary or hidden file or directory left under ``final/`` (an interrupted write),
other than the hidden names that belong at its top."""

from __future__ import annotations

import os
from pathlib import Path

from .context import VerifyContext

# hidden names that belong in final/ (pull and merge targets, the Hub's attributes file, a download cache)
ALLOWED_HIDDEN = {".snapshot.json", ".merged.json", ".gitattributes", ".cache"}


def check_stray(ctx: VerifyContext) -> None:
    """Report every hidden or temporary file and directory under ``final/`` (not descending into the latter)."""
    if not ctx.final.is_dir():
        return
    for dirpath, dirnames, filenames in os.walk(ctx.final):
        top = Path(dirpath) == ctx.final
        keep = []
        for d in sorted(dirnames):
            if top and d in ALLOWED_HIDDEN:
                continue
            if d.startswith(".") or ".tmp" in d:
                ctx.problem(Path(dirpath) / d, "a hidden or temporary directory left in final/; if no stage is "
                                               "running, delete it")
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            if top and name in ALLOWED_HIDDEN:
                continue
            if name.startswith(".") or ".tmp" in name:
                ctx.problem(Path(dirpath) / name, "a temporary or hidden file left by an interrupted write; if "
                                                  "no stage is running, delete it")
