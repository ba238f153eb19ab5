"""``sniff-qk verify DATA_ROOT``: check a data root's dataset, card and staged chunks, changing nothing.

Checks, a few files at a time (``VERIFY_WORKERS``) with bounded memory (record batches of one row
group at most per file), in this order, each in its own module:

- :mod:`.stray_files`: no leftover temporary or hidden files under ``final/``;
- :mod:`.data_layout`: ``final/data/<split>/<config>/data.parquet`` and nothing else; split and config names
  are valid;
- :mod:`.data_files` (and :mod:`.rows`), split by split: every data file is readable Parquet with exactly the
  dataset schema (``writer.row_schema``; all files of a split agree on head dimension, vector dtype and
  ``token_str``); keys ``(example_id, position)`` are unique and sorted; ``layer``/``head``/``kind`` are
  constant and equal to the path's; positions are >= 0; no vector is null; ``sliding_window`` is constant;
  every bucket is the one the recorded sampler (:mod:`.samplers`) gives its position; and, for a bounded
  random subset of rows, the frozen sampler selects the row;
- :mod:`.card`: ``final/README.md``'s front matter parses and its ``configs:`` list matches the files exactly,
  aggregates included (globs are expanded against the files on disk);
- :mod:`.staged_chunks`: ``staging/chunk-*/manifest.json`` parses, and every staged file it lists has exactly
  the row count it records and is the file the chunk wrote. A chunk without a manifest is a warning.

They share a :class:`~.context.VerifyContext` (the data root, ``final/``, the records read once, the report).

A data root (or its ``final/``) holding a dataset of the original tool (:mod:`qk_sniffer.legacy`) is one problem,
and nothing else is checked. A split migrated from it (``sniff-qk migrate``) has no sampler to check its rows against.
Without a recorded sampler (and no config for the split), bucket and selection checks are skipped and the
report says so.
"""

from __future__ import annotations

from pathlib import Path

from ..layout import staging_dir
from ..legacy import local_problem
from .card import check_card
from .context import SAMPLE_ROWS, VerifyContext
from .data_files import VERIFY_WORKERS, check_split
from .data_layout import scan_layout
from .report import VerifyReport
from .samplers import sampler_u
from .staged_chunks import check_staged_chunks
from .stray_files import check_stray

__all__ = ["SAMPLE_ROWS", "VERIFY_WORKERS", "VerifyReport", "sampler_u", "verify", "verify_staging"]


def verify(root: Path, *, cfg: dict | None = None, sample_rows: int | None = SAMPLE_ROWS) -> VerifyReport:
    """Check the data root ``root`` (its ``final/`` dataset, card and ``staging/`` chunks); change nothing.

    ``cfg`` (a validated config) is optional: it supplies the sampler of its own split when neither the
    README nor ``.merged.json`` records one, and flags staged chunks another config produced.
    ``sample_rows`` bounds the rows per file whose sampling decision is recomputed (None: all rows).
    """
    ctx = VerifyContext(Path(root), cfg, sample_rows)
    if not ctx.root.is_dir():
        ctx.problem(str(ctx.root), "is not a directory; pass a data root (output.data_root, default "
                                   "data/<name>)")
        return ctx.report
    original = local_problem(ctx.root)  # a dataset of the original tool: one line, not one per file
    if original is not None:
        ctx.report.problems.append(original)
        return ctx.report
    if not ctx.final.is_dir() and not staging_dir(ctx.root).is_dir():
        ctx.problem(str(ctx.root), "has neither final/ nor staging/: it is not a data root (or nothing ran "
                                   "yet); pass output.data_root of the config")
        return ctx.report
    ctx.load_records()
    check_stray(ctx)
    layout = scan_layout(ctx)
    for split in sorted(layout):
        check_split(ctx, split, layout[split])
    ctx.report.checked["splits"] = len(layout)
    ctx.report.checked["configs"] = len({c for cfgs in layout.values() for c in cfgs})
    check_card(ctx, layout)
    check_staged_chunks(ctx)
    return ctx.report


def verify_staging(root: Path, *, cfg: dict | None = None) -> VerifyReport:
    """Check only the staged chunks under ``root/staging`` against their manifests (a sweep member's own staging,
    whose ``final/`` is its dataset root's and is checked once there)."""
    ctx = VerifyContext(Path(root), cfg, SAMPLE_ROWS)
    check_staged_chunks(ctx)
    return ctx.report
