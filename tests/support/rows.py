"""Comparing rows that different processes computed for the same chunks."""

from __future__ import annotations

import numpy as np

# Two separate CPU processes computing the same chunk did not always agree to the last bit: an
# occasional process got the first call of the rotary embedding's cos wrong (~2e-4) in half of the
# batch's rows, which the tiny random Llama's 0.2-std weights amplify to ~2e-3 in the vectors.
# sniff-chunk now computes its first batch twice and drops the first result, after which repeated
# processes gave identical vectors; comparisons across processes keep this margin all the same (keys
# and every other column are compared exactly).
CROSS_PROCESS_RTOL = 2e-3


def assert_same_rows(a, b, what: str = "") -> None:
    """Two Arrow tables or polars frames sorted by key: equal keys and columns, vectors to CROSS_PROCESS_RTOL."""
    a, b = (t.to_arrow() if hasattr(t, "to_arrow") else t for t in (a, b))
    for col in a.column_names:
        if col != "vector":
            assert a[col].equals(b[col]), f"{what}: column {col} differs"
            continue
        vx, vy = (np.stack(t[col].to_numpy(zero_copy_only=False)) for t in (a, b))
        scale = np.maximum(np.abs(vy).max(axis=1, keepdims=True), 1e-30)
        err = float((np.abs(vx - vy) / scale).max()) if vx.size else 0.0
        assert vx.shape == vy.shape and err <= CROSS_PROCESS_RTOL, f"{what}: vectors differ (relative {err:.2e})"
