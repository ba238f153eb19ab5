"""The ``report`` command and the ``render_report`` rule (workflow/rules/report.smk): the statistics of the
final dataset computed once, every figure drawn (in worker processes where there are several), the metadata
page, and ``run/stats.json`` with the numbers behind the figures.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from ..config import data_root, split_name
from ..layout import atomic_write_json
from .canvas import FORMATS
from .figures import KIND_LABEL, render_chunk_timings, render_heads, render_norms, render_rows_per_bucket
from .page import render_metadata_html
from .scan import compute_stats
from .sources import KINDS, split_metadata

log = logging.getLogger("qk_sniffer")

FIGURE_WORKERS = min(4, os.cpu_count() or 1)  # figures drawn at once, each in its own process


def _jsonable(obj):
    """Plain JSON types: numpy scalars converted, NaN/inf as null, keys as strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _warm() -> None:
    """A figure worker's first job: have matplotlib's drawing code loaded before the statistics are ready."""
    import matplotlib.backends.backend_agg  # noqa: F401
    import matplotlib.backends.backend_svg  # noqa: F401


def _figure_pool(workers: int):
    """Worker processes for drawing figures (each figure is independent; matplotlib holds the GIL throughout).

    They are forked from a fresh server process (``forkserver``), never from this one, whose pyarrow and
    polars threads a fork must not copy; None when one process is all there is."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if workers < 2:
        return None
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["qk_sniffer.report", "matplotlib.figure"])
    else:
        ctx = mp.get_context("spawn")
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
        for _ in range(workers):  # start the workers now: they load matplotlib while the statistics are computed
            pool.submit(_warm)
    except (OSError, ImportError, NotImplementedError, BrokenProcessPool) as exc:  # e.g. no working semaphores
        log.warning("report: no figure worker processes (%s); drawing in this process", exc)
        return None
    return pool


def render_report(cfg: dict, out_dir: Path, *, root: Path | None = None, formats=FORMATS,
                  workers: int | None = None) -> list[Path]:
    """Draw the report of the dataset under ``cfg``'s data root into ``out_dir``; returns every file written.

    ``out_dir/rows_per_bucket/<split>.png``, ``out_dir/norms/<split>/<queries|keys>.png``,
    ``out_dir/heads/<split>.png`` (each also as ``.svg`` by default), ``out_dir/run/chunk_timings.png``,
    ``out_dir/run/run_metadata.html`` and ``out_dir/run/stats.json`` (the numbers behind the figures).
    Figures are drawn by ``workers`` processes at once (default 1: in this process; the ``report`` command
    uses ``FIGURE_WORKERS``); the files are the same either way. Worker processes import the main module
    as multiprocessing does: a script calling this with ``workers > 1`` needs an ``if __name__ == "__main__"``
    guard.
    """
    root = Path(root) if root is not None else data_root(cfg)
    out = Path(out_dir)
    for sub in ("rows_per_bucket", "norms", "heads", "run"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pool = _figure_pool(workers or 1)
    try:
        stats = compute_stats(root)
        metas = {s: split_metadata(root, s) for s in stats["splits"]}
        jobs: list[tuple] = []
        for split, st in stats["splits"].items():
            jobs.append((render_rows_per_bucket, split, st, out / "rows_per_bucket" / split, formats))
            for kind in KINDS:
                if st["config_counts"][kind]:
                    jobs.append((render_norms, split, st, kind, out / "norms" / split / KIND_LABEL[kind], formats))
            jobs.append((render_heads, split, st, out / "heads" / split, formats))
        jobs.append((render_chunk_timings, stats["chunks"], out / "run" / "chunk_timings", formats))
        drawn = None
        if pool is not None:
            try:
                drawn = [f.result() for f in [pool.submit(*job) for job in jobs]]
            except BrokenProcessPool as exc:  # e.g. a worker could not start: draw them here instead
                log.warning("report: figure worker processes failed (%s); drawing in this process", exc)
        if drawn is None:
            drawn = [job[0](*job[1:]) for job in jobs]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    written = [p for paths in drawn for p in paths]
    written.append(render_metadata_html(stats, metas, out / "run" / "run_metadata.html"))
    stats_path = out / "run" / "stats.json"
    atomic_write_json(stats_path, _jsonable({**stats, "current_split": split_name(cfg)}))
    written.append(stats_path)
    return written


def report_main(cfg: dict, out_dir: Path | None = None) -> list[Path]:
    """The ``report`` command: :func:`render_report` into ``out_dir`` (default ``<data_root>/report``)."""
    root = data_root(cfg)
    out = Path(out_dir) if out_dir is not None else root / "report"
    written = render_report(cfg, out, root=root, workers=FIGURE_WORKERS)
    log.info("report: %d files under %s", len(written), out)
    return written
