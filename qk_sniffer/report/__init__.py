"""``report``: statistics of the final dataset and the figures of the workflow report.

Everything is computed from ``final/data/<split>/<config>/data.parquet`` (README.md, "What you get"),
one config file at a time and one record batch at a time, so memory stays bounded by a batch
plus a few small per-split tables, whatever the size of the dataset:

- rows per position bucket, checked against what the sampler (config/README.md, capture) should give:
  an example whose rows reach beyond bucket ``b`` (in any config of the split) certainly
  contains all of ``b``'s positions, so each of its configs holds ``width(b) * p(b)`` rows of
  ``b`` on average. The decision for a token depends only on its own coordinates, so choosing
  those examples by rows at other positions does not bias the count;
- the vector statistics below over a bounded prefix of the examples: the rows of every config
  whose ``example_id`` is below the id at row ``VECTOR_SAMPLE_ROWS`` of the largest config (files
  are sorted by example id, so this is a prefix of each file, and queries and keys of one example
  are always in or out together); the rest of a file is read without its vector column, so the
  report's cost stops growing with the dataset;
- query and key norm quartiles per (layer, kind, bucket), read from log-spaced histograms
  (``BINS_PER_DECADE`` bins per decade: quantiles are exact to about 1 %);
- mean norm per (layer, head, kind) and the mean cosine between the queries of a head and the
  keys of its key/value head within one (example, bucket), computed from per-group sums of unit
  vectors (``sum_i sum_j cos(q_i, k_j) = (sum_i q_i/|q_i|) . (sum_j k_j/|k_j|)``), never by
  forming the pairs;
- throughput of each staged chunk, from ``staging/chunk-*/manifest.json``.

``render_report`` draws the figures of ``snakemake --report`` (workflow/rules/report.smk). The dataset card's
figure (``qk_sniffer.card.figure``) is drawn with ``figures.draw_rows``; this package does not import the card.
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display) and
every file is written under a temporary name and renamed into place.

Modules, in the order data flows through them:

- ``sources``: the splits and config files found under ``final/``, what was recorded about each split
  (merge record, card front matter), rows from the Parquet footers, the staged chunks' timings;
- ``buckets``: the positions a bucket spans and the sampler's keep probability;
- ``accumulators``: norm histograms, per-layer tallies, sums of unit vectors per (example, bucket);
- ``scan``: one pass over a split's files, and ``compute_stats``;
- ``canvas`` and ``figures``: figure files and the figures of the workflow report;
- ``page_template`` and ``page``: the run metadata page (Jinja2);
- ``workflow_report``: ``render_report`` and the ``report`` command.

This module only re-exports their public names.
"""

from .accumulators import BINS_PER_DECADE, NormHistogram
from .buckets import bucket_bounds
from .canvas import FORMATS, save_figure
from .figures import render_chunk_timings, render_heads, render_norms, render_rows_per_bucket
from .page import metadata_rows, render_metadata_html
from .scan import compute_stats
from .sources import KINDS, ReportError, chunk_timings, discover_splits, rows_per_group, split_metadata
from .workflow_report import FIGURE_WORKERS, render_report, report_main

__all__ = [
    "BINS_PER_DECADE", "FIGURE_WORKERS", "FORMATS", "KINDS", "NormHistogram",
    "ReportError", "bucket_bounds", "chunk_timings", "compute_stats", "discover_splits", "metadata_rows",
    "render_chunk_timings", "render_heads", "render_metadata_html", "render_norms",
    "render_report", "render_rows_per_bucket", "report_main", "rows_per_group", "save_figure", "split_metadata",
]
