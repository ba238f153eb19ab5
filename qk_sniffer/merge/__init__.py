"""``merge-staging``: replay staged chunks into ``final/`` (README.md, "What you get": how a merge appends).

Per ``(split, config)`` the final file and the staged chunk files are unioned on
``(example_id, position)``; rows already in ``final/`` win (and of a key staged twice, the first).
A staged row whose key is kept with another vector is a *rounding difference* when the two vectors
differ by no more than float rounding across batch shapes allows (:data:`ROUNDING_RTOL`), else a
*conflict*; ``final/.merged.json`` counts both per config, and only conflicts are warned about.
Only files whose row set grows are rewritten, so a second merge of the same chunks touches nothing.

A merge is all or nothing: every file it grows and ``.merged.json`` are written under temporary
names next to their places and renamed into place only once all of them are written. A merge that
fails (a full disk, a damaged file) removes what it wrote and leaves ``final/`` exactly as it was;
the price is room for the new version of each file it grows next to the old one until the end.

Two ways to write a grown file, chosen per config:

- **append** when every staged row's key comes after every key already there (new examples: the
  chunks of a run cover disjoint, increasing example ranges and sniff-chunk writes each staged file
  sorted, in the final format): the final file's bytes and the staged files' row groups are
  concatenated byte for byte under one new footer (``qk_sniffer.parquet.concat_files``; :mod:`.append`). Of
  each staged file only the key and bucket columns are read, never the vectors. Memory stays at a few
  columns of one staged file per thread (``APPEND_WORKERS``).
- **rewrite** otherwise (keys that interleave or repeat, or files whose Parquet schema or metadata
  differ): the union is decoded, deduplicated, sorted and encoded again. Memory is bounded by one
  config (its final file plus its staged rows) per worker thread (``MERGE_WORKERS``, two at most; :mod:`.rewrite`).

Both give the same rows in the same order; ``final/.merged.json`` records which one each touched
config took (``methods``).

The package, one concern per module: :mod:`.inputs` (what a merge reads and every refusal, before anything is
written), :mod:`.append` and :mod:`.rewrite` (the two ways), :mod:`.rounding` (rounding differences against
conflicts), :mod:`.outputs` (the temporaries renamed into place together), :mod:`.record` (``.merged.json``)
and :mod:`.run` (``merge_staging``, the steps in order). What a data root holds and how to read it back
(``final_configs``, ``scan_chunks``, ``bucket_counts``, ``MERGED_NAME``) is :mod:`qk_sniffer.store`'s; the
``.merged.json`` record itself is :class:`qk_sniffer.records.MergeRecord`.
"""

from __future__ import annotations

from .errors import MergeError
from .rounding import CONFLICT, ROUNDING, ROUNDING_RTOL, SAME, compare_vectors
from .run import merge_staging

__all__ = ["CONFLICT", "ROUNDING", "ROUNDING_RTOL", "SAME", "MergeError", "compare_vectors", "merge_staging"]
