"""``sniff-qk migrate``: convert a dataset of the original qk-sniffer tool into this project's layout and schema.

Source: a folder holding it (a download of its repo or branch), else the config's remote (downloaded into the
data root first), in either layout of :mod:`qk_sniffer.legacy` (README layout: every split keeps its name; branch
layout: one model, which becomes the config's split). Result: ``final/data/<split>/<config>/data.parquet`` of the
data root in the dataset schema (layer/head/kind from the path, fixed-size vectors), sorted by and unique on
``(example_id, position)`` (of rows sharing a key the first is kept; those with another vector are counted),
written by ``parquet.write_parquet_atomic``; and the card, recording each migrated split's sampling as the original
tool's (``legacy.ORIGINAL_SAMPLING``): merging captures into it needs ``output.allow_mixed_sampling``, and
``verify`` skips its sampler checks.

Every source file is read, checked and converted into a temporary folder of the data root before ``final/``
changes: bad input changes nothing. Then ``<data_root>/migrate.json`` says ``moving``, the card records the sampling,
the files are renamed into ``final/``, the card is rendered, ``migrate.json`` says ``done``. A rerun changes nothing
or completes a killed run. A split in ``final/`` that is not this migration's is refused (never merged into).

The package, one concern per module, in this order (each imports only those before it): :mod:`.errors`
(:class:`MigrateError` and the ``nothing was migrated`` tail of its messages), :mod:`.source` (:func:`plan_source`:
what the original tool's dataset holds, checked from the footers), :mod:`.convert` (:func:`convert_config`: one
config's files -> a table in this project's row schema) and :mod:`.install` (the destination's checks, the
journal, the install into ``final/``, the card's record, :func:`migrate` and ``cmd_migrate``).
"""

from __future__ import annotations

from .convert import convert_config
from .errors import NOTHING, MigrateError
from .install import JOURNAL, WORK_PREFIX, cmd_migrate, migrate
from .source import plan_source

__all__ = ["JOURNAL", "NOTHING", "WORK_PREFIX", "MigrateError", "cmd_migrate", "convert_config", "migrate", "plan_source"]
