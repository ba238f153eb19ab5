"""Streaming accumulators of the report's statistics: norm histograms per bucket, the per-layer tally of a
split scan, and sums of unit vectors per (example, bucket) from which mean q-k cosines are computed.

Each holds only sums and counts, so memory stays bounded by a record batch plus a few small tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

# norm histograms: log10(norm) in [LOG10_LO, LOG10_HI), BINS_PER_DECADE bins per decade; values outside are
# counted in the first/last bin (a zero vector in the first)
LOG10_LO, LOG10_HI, BINS_PER_DECADE = -6.0, 6.0, 200
N_BINS = int(round((LOG10_HI - LOG10_LO) * BINS_PER_DECADE))
QUANTILES = (0.25, 0.5, 0.75)


class NormHistogram:
    """Counts of log10(norm) per bucket in fixed log-spaced bins, stored sparsely as (bucket * N_BINS + bin)."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, buckets: np.ndarray, norms: np.ndarray) -> None:
        """Count ``norms`` (one per row) in their rows' ``buckets``."""
        with np.errstate(divide="ignore"):
            lg = np.log10(norms)
        bins = np.clip(np.floor((lg - LOG10_LO) * BINS_PER_DECADE), 0, N_BINS - 1)
        bins = np.nan_to_num(bins, nan=0.0).astype(np.int64)
        keys, counts = np.unique(buckets.astype(np.int64) * N_BINS + bins, return_counts=True)
        self._parts.append((keys, counts.astype(np.int64)))
        self._pending += 1
        if self._pending >= 32:
            self._compact()

    def _compact(self) -> None:
        if len(self._parts) > 1:
            keys = np.concatenate([k for k, _ in self._parts])
            counts = np.concatenate([c for _, c in self._parts])
            uniq, inv = np.unique(keys, return_inverse=True)
            self._parts = [(uniq, np.bincount(inv, weights=counts).astype(np.int64))]
        self._pending = 0

    def quantiles(self, qs=QUANTILES) -> dict[int, list[float]]:
        """bucket -> the norms at quantiles ``qs`` (interpolated within a bin, in log space)."""
        self._compact()
        if not self._parts:
            return {}
        keys, counts = self._parts[0]
        out: dict[int, list[float]] = {}
        buckets = keys // N_BINS
        for b in np.unique(buckets):
            sel = buckets == b
            bins, c = keys[sel] % N_BINS, counts[sel]
            cum = np.cumsum(c)
            n = cum[-1]
            vals = []
            for q in qs:
                rank = q * n
                i = int(np.searchsorted(cum, rank, side="left"))
                i = min(i, len(c) - 1)
                before = cum[i] - c[i]
                frac = (rank - before) / c[i] if c[i] else 0.5
                vals.append(float(10 ** (LOG10_LO + (bins[i] + min(max(frac, 0.0), 1.0)) / BINS_PER_DECADE)))
            out[int(b)] = vals
        return out


@dataclass
class LayerKind:
    """Norm statistics of one (layer, kind): the histogram, and rows and summed norms per bucket."""

    hist: NormHistogram = field(default_factory=NormHistogram)
    n: dict = field(default_factory=dict)  # bucket -> rows
    norm_sum: dict = field(default_factory=dict)  # bucket -> sum of norms


@dataclass
class Tally:
    """What scanning some of a split's files adds up to (one per layer, then summed)."""

    rows: dict = field(default_factory=lambda: {"q": {}, "k": {}})  # kind -> bucket -> rows
    covered_rows: dict = field(default_factory=lambda: {"q": {}, "k": {}})  # kind -> bucket -> rows of covered examples
    layer_kind: dict = field(default_factory=dict)  # (layer, kind) -> LayerKind
    config_stats: dict = field(default_factory=dict)
    cosine: dict = field(default_factory=dict)  # (layer, query head) -> mean cosine with its key head
    sampled_rows: int = 0

    def count_rows(self, kind: str, bucket: np.ndarray, covered: bool = False) -> None:
        """Count rows of ``kind`` per bucket (``covered``: into the rows of examples that cover the bucket)."""
        per = (self.covered_rows if covered else self.rows)[kind]
        if not bucket.size:
            return
        if bucket.min() >= 0:
            counts = np.bincount(bucket)
            found = np.flatnonzero(counts)
            counts = counts[found]
        else:  # not a bucket sniff-chunk writes (verify reports it); counted all the same
            found, counts = np.unique(bucket, return_counts=True)
        for b, c in zip(found.tolist(), counts.tolist()):
            per[b] = per.get(b, 0) + c

    def add(self, other: Tally) -> None:
        """Add the tally of other layers to this one."""
        for mine, theirs in ((self.rows, other.rows), (self.covered_rows, other.covered_rows)):
            for kind, per in theirs.items():
                for b, c in per.items():
                    mine[kind][b] = mine[kind].get(b, 0) + c
        self.layer_kind.update(other.layer_kind)  # a layer's entries come from that layer alone
        self.config_stats.update(other.config_stats)
        self.cosine.update(other.cosine)
        self.sampled_rows += other.sampled_rows


@dataclass
class UnitVectorGroups:
    """Sums of unit vectors per (example_id, bucket), sorted by key; ``count`` rows with a nonzero norm each."""

    example_id: np.ndarray
    bucket: np.ndarray
    sums: np.ndarray
    count: np.ndarray

    @staticmethod
    def of(example_id: np.ndarray, bucket: np.ndarray, unit: np.ndarray, weight: np.ndarray) -> UnitVectorGroups:
        """Group rows by (example_id, bucket), summing ``unit`` vectors and ``weight`` (1 per nonzero row)."""
        if example_id.size == 0:
            d = unit.shape[1] if unit.ndim == 2 else 0
            return UnitVectorGroups(example_id.astype(np.int64), bucket.astype(np.int64), np.zeros((0, d)),
                                    np.zeros(0, np.int64))
        order = np.lexsort((bucket, example_id))
        ex, bk = example_id[order], bucket[order]
        new = np.ones(ex.size, dtype=bool)
        new[1:] = (ex[1:] != ex[:-1]) | (bk[1:] != bk[:-1])
        starts = np.flatnonzero(new)
        return UnitVectorGroups(ex[starts].astype(np.int64), bk[starts].astype(np.int64),
                                np.add.reduceat(unit[order], starts, axis=0),
                                np.add.reduceat(weight[order], starts).astype(np.int64))

    @staticmethod
    def concat(parts: list[UnitVectorGroups]) -> UnitVectorGroups:
        """One table from partial tables (a group may straddle two record batches)."""
        ex = np.concatenate([p.example_id for p in parts])
        bk = np.concatenate([p.bucket for p in parts])
        sums = np.concatenate([p.sums for p in parts])
        cnt = np.concatenate([p.count for p in parts])
        return UnitVectorGroups.of(ex, bk, sums, cnt)

    def frame(self, index_name: str) -> pl.DataFrame:
        """(example_id, bucket, ``index_name``: row of this table) as a frame to join on."""
        return pl.DataFrame({"example_id": self.example_id, "bucket": self.bucket,
                             index_name: np.arange(self.example_id.size, dtype=np.int64)})
