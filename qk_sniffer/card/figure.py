"""``final/figures/rows_per_bucket.png``, the figure the dataset card embeds: rows per position bucket of
every split, counted from the ``bucket`` and ``example_id`` columns alone.

It is drawn with the report's figure code (``report.figures.draw_rows``, the report's canvas and sources); the
report does not import the card.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ..layout import final_dir
from ..report.buckets import usable_sampling
from ..report.canvas import new_figure, no_data, save_figure
from ..report.figures import draw_rows
from ..report.sources import KINDS, config_table, selected_splits, split_metadata

CARD_FIGURE = Path("figures") / "rows_per_bucket.png"


def _bucket_rows(paths: list[Path]) -> dict[int, int]:
    """Rows per bucket over ``paths``, from their ``bucket`` column alone."""
    if not paths:
        return {}
    df = pl.scan_parquet(paths).group_by("bucket").len().collect(engine="streaming")
    return {int(b): int(n) for b, n in df.iter_rows()}


def render_card_figure(root: Path, split: str | None = None) -> Path:
    """``final/figures/rows_per_bucket.png``: rows per position bucket of every split (or ``split``), all layers.

    Reads only the ``bucket`` and ``example_id`` columns. The file is replaced atomically and left
    untouched when its bytes would not change, so an unchanged dataset pushes no new figure.
    """
    root = Path(root)
    splits = selected_splits(root, split)
    panels = []
    for s in splits:
        configs = config_table(root, s)
        meta = split_metadata(root, s)
        paths = {k: [p for *_, kind, p in configs if kind == k] for k in KINDS}
        rows = {k: _bucket_rows(paths[k]) for k in KINDS}
        all_paths = paths["q"] + paths["k"]
        examples = int(pl.scan_parquet(all_paths).select(pl.col("example_id").n_unique()).collect(engine="streaming")
                       .item()) if all_paths else 0
        buckets = sorted(set(rows["q"]) | set(rows["k"]))
        panels.append((s, {
            "buckets": [{"bucket": b, "rows": {k: rows[k].get(b, 0) for k in KINDS}} for b in buckets],
            "config_counts": {k: len(paths[k]) for k in KINDS},
            "examples": examples,
            "sampling": usable_sampling(meta),
            "model": meta.get("model"),
        }))
    n = max(1, len(panels))
    fig = new_figure(6.4, 3.4 * n + 0.3)
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)).ravel()
    if not panels:
        no_data(axes[0], "no rows yet")
    for ax, (s, st) in zip(axes, panels):
        draw_rows(ax, st, compact=True)
        ax.set_title(f"{s}: rows per position bucket (all layers and heads)", fontsize=9)
    path = final_dir(root) / CARD_FIGURE
    save_figure(fig, path.with_suffix(""), formats=("png",))
    return path
