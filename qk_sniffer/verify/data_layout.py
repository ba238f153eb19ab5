"""The layout check: ``final/data/<split>/<config>/data.parquet`` and nothing else; split and config names valid.

:func:`scan_layout` returns the files it found (split -> config -> data file), which the data-file and card
checks then read.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..layout import CONFIG_RE
from .context import VerifyContext

SPLIT_RE = re.compile(r"\w+(\.\w+)*")


def scan_layout(ctx: VerifyContext) -> dict[str, dict[str, Path]]:
    """Split -> config -> data file; reports names and files that are not part of the layout."""
    base = ctx.final / "data"
    out: dict[str, dict[str, Path]] = {}
    if not base.is_dir():
        if ctx.final.is_dir():
            ctx.warn(base, "does not exist: the dataset has no data files yet")
        return out
    for entry in sorted(base.iterdir()):
        if entry.name.startswith("."):
            continue  # reported by the stray check
        if not entry.is_dir():
            ctx.problem(entry, "unexpected file: final/data/ holds one directory per split; move or delete it")
            continue
        if not SPLIT_RE.fullmatch(entry.name):
            ctx.problem(entry, f"split name {entry.name!r} is not valid for datasets (letters, digits, _ and "
                               "inner dots only, ^\\w+(\\.\\w+)*$); rename the directory and render the README "
                               "again, and set output.split_name to the new name")
        configs: dict[str, Path] = {}
        for d in sorted(entry.iterdir()):
            if d.name.startswith("."):
                continue
            if not d.is_dir():
                ctx.problem(d, "unexpected file: a split directory holds one directory per config; move or "
                               "delete it")
                continue
            if not CONFIG_RE.match(d.name):
                ctx.problem(d, f"{d.name!r} is not a config name (lLLhHHq or lLLhHHk); move or delete it")
                continue
            for f in sorted(d.iterdir()):
                if f.name.startswith(".") or f.name == "data.parquet":
                    continue
                glob = " (load_dataset's *.parquet globs read it as part of this config)" \
                    if f.name.endswith(".parquet") else ""
                ctx.problem(f, f"unexpected file in a config directory{glob}; move or delete it")
            data = d / "data.parquet"
            if data.is_file():
                configs[d.name] = data
            else:
                ctx.warn(d, "config directory without data.parquet; delete it")
        if configs:
            out[entry.name] = configs
        else:
            ctx.warn(entry, "split directory without data files")
    return out
