"""``card``: the dataset card, ``final/README.md`` (README.md: "What you get" and "Hub"), written by ``render-readme``.

The front matter's ``configs:`` lists every concrete config found under ``final/data/<split>/<config>/data.parquet``
and the aggregates ``all`` (default), ``all_q``, ``all_k``, ``layerLL``, ``layerLL_q``, ``layerLL_k`` and
``lLLhHH``; each lists, per split, paths or globs that match exactly its configs, and only the splits that have
them. The ``qk_sniffer:`` key records per-split run metadata (model, dataset, sampling, rows per bucket), which
``merge_staging`` reads back to refuse appending with different sampling settings. Other front-matter keys
(license, tags, ...) and the body outside the ``<!-- qk-sniffer:begin -->`` / ``<!-- qk-sniffer:end -->`` markers
belong to the user and are kept as they are.

Modules, in the order the card is put together:

- ``configs``: the splits and configs on disk, the ``configs:`` list, the Hub viewer's limits;
- ``metadata``: the per-split record of ``qk_sniffer:`` (``split_meta``);
- ``figure``: ``final/figures/rows_per_bucket.png``, drawn with the report's figure code;
- ``body``: the generated section, rendered from ``templates/card_body.md.j2`` (Jinja2);
- ``render``: ``render_card`` (the card's text) and ``render_readme`` (the stage).

The card imports the leaves (``store``, ``front_matter``, ``layout``, ``config``, ``sampling``), ``legacy`` and
``report``; none of them imports the card. This module only re-exports the public names.
"""

from .body import BEGIN, END, generated_body, replace_section
from .configs import VIEWER_MAX_CONFIGS, VIEWER_MAX_SPLITS, build_configs, discover
from .figure import CARD_FIGURE, render_card_figure
from .metadata import disk_stats, split_meta
from .render import OWN_KEYS, render_card, render_readme

__all__ = [
    "BEGIN", "CARD_FIGURE", "END", "OWN_KEYS", "VIEWER_MAX_CONFIGS", "VIEWER_MAX_SPLITS", "build_configs", "discover",
    "disk_stats", "generated_body", "render_card", "render_card_figure", "render_readme", "replace_section",
    "split_meta",
]
