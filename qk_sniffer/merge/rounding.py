"""Rounding differences against conflicts: how a staged vector that differs from the kept vector of its key is
classified (:data:`ROUNDING_RTOL`), and what ``final/.merged.json`` counts of each class."""

from __future__ import annotations

import numpy as np
import polars as pl

ROUNDING_RTOL: dict[str, float] = {"float32": 1e-5, "float16": 2.0 ** -9, "bfloat16": 2.0 ** -6}
"""How far a staged vector may lie from the kept vector of its key and still count as a rounding difference.

A pair of rows (staged ``s``, kept ``k``, same key) whose vectors are not equal element for element (NaN equal
to NaN) is a *rounding difference* when ``max_i |s_i - k_i| <= ROUNDING_RTOL[p] * scale`` and a *conflict*
otherwise, where ``scale = max(max_i |s_i|, max_i |k_i|, smallest normal number of p)`` (a tolerance relative
to the larger of the two rows' largest elements) and ``p`` is the coarser of the precisions the two rows'
values have: ``bfloat16`` for a row whose every value is a bfloat16 number (a float32 column of a model run in
bf16: the low 16 bits of each float are zero), else ``float16`` for a row whose every value is a float16 number
(``capture.vector_dtype: float16``, or a model run in fp16), else ``float32``. The relative difference
recorded is ``max_i |s_i - k_i| / scale``.

- float32: 1e-5, about 84 float32 ulps of the row's largest element. The same examples run in batches of other
  shapes differ by up to ~2e-6 (on the CPU, 3% of the tiny test model's rows differ between batch sizes 8 and
  3, by at most 1.9e-6; a user's extended dataset showed 2e-6), so 1e-5 leaves a factor of five; it is also
  the bound the tests hold every stored vector to against q/k recomputed from the weights.
- float16 (11 significant bits): 2**-9, two float16 ulps of the row's largest element (one ulp is at most
  2**-10 of it): rounding a float32 difference of ~2e-6 to float16 flips at most one ulp of an element.
- bfloat16 (8 significant bits): 2**-6, two bfloat16 ulps of the row's largest element (one ulp is at most
  2**-7 of it, a half-ulp rounding ~4e-3).

Whatever the class, the kept row stays as it was: the classification only decides what is reported.
"""
ROUNDING_BLOCK = 1 << 14  # rows compared at once: the comparison's temporaries stay at tens of MB (head dim 128)
_TINY = {"float32": float(np.finfo(np.float32).tiny), "float16": float(np.finfo(np.float16).tiny),
         "bfloat16": float(np.finfo(np.float32).tiny)}  # bfloat16 has float32's exponent range


def _precision(v: np.ndarray) -> np.ndarray:
    """Per row of ``v`` (float32, rows of one vector each): 2 when every value is a bfloat16 number, else 1 when
    every value is a float16 number, else 0 (see :data:`ROUNDING_RTOL`)."""
    bf16 = ((v.view(np.uint32) & 0xFFFF) == 0).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        f16 = ((v.astype(np.float16).astype(np.float32) == v) | np.isnan(v)).all(axis=1)
    return np.where(bf16, 2, np.where(f16, 1, 0))


_PRECISIONS = ("float32", "float16", "bfloat16")  # indexed by _precision's codes
_RTOL = np.array([ROUNDING_RTOL[p] for p in _PRECISIONS])
_TINY_BY_CODE = np.array([_TINY[p] for p in _PRECISIONS])


SAME, ROUNDING, CONFLICT = 0, 1, 2  # what compare_vectors finds of a pair of rows


def compare_vectors(staged: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of two ``(n, dim)`` float arrays compared pair by pair as :data:`ROUNDING_RTOL` says: returns each
    pair's class (``SAME``, ``ROUNDING`` or ``CONFLICT``) and relative difference (0 for equal vectors; NaN where
    a NaN faces a number, which is a conflict). Vectorised, :data:`ROUNDING_BLOCK` rows at a time."""
    n = len(staged)
    kind = np.full(n, SAME, dtype=np.int8)
    rel = np.zeros(n, dtype=np.float64)
    for at in range(0, n, ROUNDING_BLOCK):
        s = np.asarray(staged[at:at + ROUNDING_BLOCK], dtype=np.float32)
        k = np.asarray(kept[at:at + ROUNDING_BLOCK], dtype=np.float32)
        same = (s == k) | (np.isnan(s) & np.isnan(k))
        differs = ~same.all(axis=1)
        if not differs.any():
            continue
        s, k, same = s[differs], k[differs], same[differs]
        code = np.maximum(_precision(s), _precision(k))  # the coarser of the two
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, np.abs(s.astype(np.float64) - k)).max(axis=1)  # NaN facing a number: NaN
            finite = np.abs(np.where(np.isfinite(s), s, 0)).max(axis=1), np.abs(np.where(np.isfinite(k), k, 0)).max(axis=1)
            r = diff / np.maximum(np.maximum(*finite), _TINY_BY_CODE[code])
        idx = np.nonzero(differs)[0] + at
        rel[idx] = r
        kind[idx] = np.where(r <= _RTOL[code], ROUNDING, CONFLICT)  # NaN is a conflict
    return kind, rel


def classify_pairs(pairs: pl.DataFrame, other: str) -> tuple[int, float, pl.DataFrame]:
    """For rows of ``pairs`` holding a staged ``vector`` and the kept one in column ``other``: the number of
    rounding differences, the largest relative difference among them, and the conflicting rows."""
    if not pairs.height:
        return 0, 0.0, pairs
    if not all(isinstance(pairs.schema[c], pl.Array) for c in ("vector", other)):  # not fixed-size: exact only
        return 0, 0.0, pairs.filter(pl.col("vector") != pl.col(other))
    kind, rel = compare_vectors(pairs.get_column("vector").to_numpy(), pairs.get_column(other).to_numpy())
    rounding = kind == ROUNDING
    top = float(rel[rounding].max()) if rounding.any() else 0.0
    return int(rounding.sum()), top, pairs.filter(pl.Series(kind == CONFLICT))
