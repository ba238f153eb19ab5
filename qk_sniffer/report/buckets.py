"""Position buckets: which positions a bucket spans, how likely the sampler keeps a token of it, and which
recorded sampling settings a single expectation can be computed from (config/README.md, capture)."""

from __future__ import annotations

import numpy as np

from ..sampling import keep_probability, log_uniform_floor


def bucket_bounds(buckets, sampling: dict) -> tuple[np.ndarray, np.ndarray]:
    """First and last position of each bucket (inclusive) under ``sampling`` (config/README.md, capture)."""
    b = np.asarray(buckets, dtype=np.int64)
    s = int(sampling.get("min_bucket_size") or 1)
    if sampling.get("type") == "log_uniform":
        p0 = log_uniform_floor(s)
        lo = np.where(b <= p0, 0, (np.int64(1) << b) - 1)
        hi = (np.int64(1) << (b + 1)) - 2
        return lo, hi
    return b * s, (b + 1) * s - 1


def keep_p(buckets, sampling: dict) -> np.ndarray:
    """The probability that ``sampling`` keeps a token of each bucket."""
    return keep_probability(np.asarray(buckets, dtype=np.int64), sampling["type"], float(sampling["base_rate"]),
                            int(sampling.get("min_bucket_size") or 1))


def usable_sampling(meta: dict) -> dict | None:
    """The split's sampling settings when one expectation applies to all its rows, else None."""
    smp = meta.get("sampling")
    if not isinstance(smp, dict) or smp.get("type") not in ("log_uniform", "uniform", "all"):
        return None
    if smp.get("base_rate") is None or meta.get("mixed_sampling") or meta.get("previous_sampling"):
        return None  # rows of two samplings in one split: no single expectation applies
    return smp
