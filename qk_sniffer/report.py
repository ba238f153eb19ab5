"""``report``: statistics of the final dataset and the figures of the workflow report and the dataset card.

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

``render_report`` draws the figures of ``snakemake --report`` (workflow/rules/report.smk);
``render_card_figure`` draws the small figure the dataset card embeds, ``final/figures/rows_per_bucket.png``.
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display) and
every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from .config import data_root, split_name
from .layout import atomic_output, atomic_write_json, atomic_write_text, final_dir, parse_config_name
from .merge import MERGED_NAME, final_configs, scan_chunks
from .sampling import keep_probability, log_uniform_floor

log = logging.getLogger("qk_sniffer")

KINDS = ("q", "k")
KIND_LABEL = {"q": "queries", "k": "keys"}
KIND_SINGULAR = {"q": "query", "k": "key"}
KIND_COLOR = {"q": "#1f6fb4", "k": "#c8402a"}
CARD_FIGURE = Path("figures") / "rows_per_bucket.png"
FORMATS = ("png", "svg")
BATCH_ROWS = 65536
VECTOR_SAMPLE_ROWS = 1 << 16  # rows of the largest config whose vectors the norm and cosine statistics read
# norm histograms: log10(norm) in [LOG10_LO, LOG10_HI), BINS_PER_DECADE bins per decade; values outside are
# counted in the first/last bin (a zero vector in the first)
LOG10_LO, LOG10_HI, BINS_PER_DECADE = -6.0, 6.0, 200
N_BINS = int(round((LOG10_HI - LOG10_LO) * BINS_PER_DECADE))
QUANTILES = (0.25, 0.5, 0.75)
MAX_PANELS = 16  # more layers than this: one line per layer instead of one panel per layer
ANNOTATE_CELLS = 256  # heatmaps with at most this many cells print their values
DPI = 110
REPORT_WORKERS = min(4, os.cpu_count() or 1)  # layers scanned at once
FIGURE_WORKERS = min(4, os.cpu_count() or 1)  # figures drawn at once, each in its own process


class ReportError(ValueError):
    """The report cannot be drawn; the message names the file and the fix."""


# -- what the card and the workflow record about a split ---------------------------------------


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def split_metadata(root: Path, split: str) -> dict:
    """Model, dataset and sampling settings recorded for ``split``, and where they were read.

    ``final/.merged.json`` (the latest merge) wins for the split it merged; the ``qk_sniffer:``
    front matter of ``final/README.md`` covers the others. Keys absent from both are absent.
    """
    final = final_dir(root)
    meta: dict = {}
    readme = final / "README.md"
    if readme.is_file():
        from .readme import read_front_matter  # readme may import this module: keep the import here

        fm, _ = read_front_matter(readme)
        qs = fm.get("qk_sniffer") if isinstance(fm.get("qk_sniffer"), dict) else {}
        rec = (qs.get("splits") or {}).get(split)
        if isinstance(rec, dict):
            meta.update(rec)
            meta["source"] = "README.md"
    merged = _read_json(final / MERGED_NAME)
    if merged and merged.get("split") == split:
        run = merged.get("run") or {}
        if merged.get("sampling"):
            meta["sampling"] = merged["sampling"]
        for key in ("model", "dataset"):
            if run.get(key):
                meta[key] = run[key]
        if (run.get("model") or {}).get("layer_windows") is not None:
            meta["layer_windows"] = run["model"]["layer_windows"]
        if merged.get("mixed_sampling"):
            meta["mixed_sampling"] = merged["mixed_sampling"]
        meta["run"] = run
        meta["source"] = MERGED_NAME
    return meta


def discover_splits(root: Path) -> list[str]:
    """Splits with at least one config file under ``final/data/``."""
    base = final_dir(root) / "data"
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and final_configs(final_dir(root), d.name))


def _splits(root: Path, split: str | None) -> list[str]:
    found = discover_splits(root)
    if split is None:
        return found
    if split not in found:
        raise ReportError(
            f"split {split!r} has no data under {final_dir(root) / 'data'} (found: {', '.join(found) or 'none'}); "
            "run the workflow (or merge_staging) first, or name one of the splits found"
        )
    return [split]


def _config_table(root: Path, split: str) -> list[tuple[int, int, str, Path]]:
    out = []
    for name, path in final_configs(final_dir(root), split).items():
        layer, head, kind = parse_config_name(name)
        out.append((layer, head, kind, path))
    return sorted(out, key=lambda t: (t[0], t[2] == "q", t[1]))


def rows_per_group(root: Path) -> dict:
    """Rows per split, kind and layer, from the Parquet footers only (no data is read).

    ``{split: {"q": rows, "k": rows, "total": rows, "configs": {"q": n, "k": n},
    "layers": {layer: {"q": rows, "k": rows}}}}``; layers are ints, sorted.
    """
    out: dict = {}
    for split in discover_splits(root):
        entry = {"q": 0, "k": 0, "total": 0, "configs": {"q": 0, "k": 0}, "layers": {}}
        for layer, _head, kind, path in _config_table(root, split):
            n = _num_rows(path)
            entry[kind] += n
            entry["total"] += n
            entry["configs"][kind] += 1
            entry["layers"].setdefault(layer, {"q": 0, "k": 0})[kind] += n
        entry["layers"] = dict(sorted(entry["layers"].items()))
        out[split] = entry
    return out


def _num_rows(path: Path) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise _damaged(path, exc) from exc


def _damaged(path: Path, exc: BaseException) -> ReportError:
    return ReportError(
        f"{path} is not readable Parquet ({type(exc).__name__}: {exc}); delete it and pull the remote again "
        "(delete final/.snapshot.json and rerun pull_hub) or rerun the chunks that produced it, then merge again"
    )


# -- buckets --------------------------------------------------------------------------------------


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


def _keep_p(buckets, sampling: dict) -> np.ndarray:
    return keep_probability(np.asarray(buckets, dtype=np.int64), sampling["type"], float(sampling["base_rate"]),
                            int(sampling.get("min_bucket_size") or 1))


def _usable_sampling(meta: dict) -> dict | None:
    smp = meta.get("sampling")
    if not isinstance(smp, dict) or smp.get("type") not in ("log_uniform", "uniform", "all"):
        return None
    if smp.get("base_rate") is None or meta.get("mixed_sampling") or meta.get("previous_sampling"):
        return None  # rows of two samplings in one split: no single expectation applies
    return smp


# -- per-split accumulation -------------------------------------------------------------------


class NormHistogram:
    """Counts of log10(norm) per bucket in fixed log-spaced bins, stored sparsely as (bucket * N_BINS + bin)."""

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, buckets: np.ndarray, norms: np.ndarray) -> None:
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
class _LayerKind:
    hist: NormHistogram = field(default_factory=NormHistogram)
    n: dict = field(default_factory=dict)  # bucket -> rows
    norm_sum: dict = field(default_factory=dict)  # bucket -> sum of norms


@dataclass
class _Tally:
    """What scanning some of a split's files adds up to (one per layer, then summed)."""

    rows: dict = field(default_factory=lambda: {"q": {}, "k": {}})  # kind -> bucket -> rows
    covered_rows: dict = field(default_factory=lambda: {"q": {}, "k": {}})  # kind -> bucket -> rows of covered examples
    layer_kind: dict = field(default_factory=dict)  # (layer, kind) -> _LayerKind
    config_stats: dict = field(default_factory=dict)
    cosine: dict = field(default_factory=dict)  # (layer, query head) -> mean cosine with its key head
    sampled_rows: int = 0

    def count_rows(self, kind: str, bucket: np.ndarray, covered: bool = False) -> None:
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

    def add(self, other: _Tally) -> None:
        for mine, theirs in ((self.rows, other.rows), (self.covered_rows, other.covered_rows)):
            for kind, per in theirs.items():
                for b, c in per.items():
                    mine[kind][b] = mine[kind].get(b, 0) + c
        self.layer_kind.update(other.layer_kind)  # a layer's entries come from that layer alone
        self.config_stats.update(other.config_stats)
        self.cosine.update(other.cosine)
        self.sampled_rows += other.sampled_rows


@dataclass
class _Groups:
    """Sums of unit vectors per (example_id, bucket), sorted by key; ``count`` rows with a nonzero norm each."""

    example_id: np.ndarray
    bucket: np.ndarray
    sums: np.ndarray
    count: np.ndarray

    @staticmethod
    def of(example_id: np.ndarray, bucket: np.ndarray, unit: np.ndarray, weight: np.ndarray) -> _Groups:
        if example_id.size == 0:
            d = unit.shape[1] if unit.ndim == 2 else 0
            return _Groups(example_id.astype(np.int64), bucket.astype(np.int64), np.zeros((0, d)), np.zeros(0, np.int64))
        order = np.lexsort((bucket, example_id))
        ex, bk = example_id[order], bucket[order]
        new = np.ones(ex.size, dtype=bool)
        new[1:] = (ex[1:] != ex[:-1]) | (bk[1:] != bk[:-1])
        starts = np.flatnonzero(new)
        return _Groups(ex[starts].astype(np.int64), bk[starts].astype(np.int64),
                       np.add.reduceat(unit[order], starts, axis=0),
                       np.add.reduceat(weight[order], starts).astype(np.int64))

    @staticmethod
    def concat(parts: list[_Groups]) -> _Groups:
        """One table from partial tables (a group may straddle two record batches)."""
        ex = np.concatenate([p.example_id for p in parts])
        bk = np.concatenate([p.bucket for p in parts])
        sums = np.concatenate([p.sums for p in parts])
        cnt = np.concatenate([p.count for p in parts])
        return _Groups.of(ex, bk, sums, cnt)

    def frame(self, index_name: str) -> pl.DataFrame:
        return pl.DataFrame({"example_id": self.example_id, "bucket": self.bucket,
                             index_name: np.arange(self.example_id.size, dtype=np.int64)})


def _read_batches(path: Path, columns: list[str]):
    try:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise _damaged(path, exc) from exc


def _sample_cutoff(paths: list[Path], limit: int) -> int | None:
    """The example id below which vectors are read: the id at row ``limit`` of the largest file (None: all)."""
    sizes = []
    for p in paths:
        try:
            sizes.append((pq.ParquetFile(p).metadata.num_rows, p))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
            raise _damaged(p, exc) from exc
    if not sizes or max(sizes)[0] <= limit:
        return None
    path = max(sizes)[1]
    seen = 0
    for batch in _read_batches(path, ["example_id"]):
        if seen + batch.num_rows > limit:
            return int(batch.column("example_id")[limit - seen].as_py())
        seen += batch.num_rows
    return None


def _batches_sampled(path: Path, cutoff: int | None):
    """``(batch, sampled)`` over ``path``: with vectors up to the first batch at or past ``cutoff``, then
    the remaining rows without their vector column (whose pages are then never read)."""
    full = ["bucket", "example_id", "position", "vector"]
    try:
        pf = pq.ParquetFile(path)
        done = 0
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=full):
            if cutoff is not None and batch.num_rows and batch.column("example_id")[0].as_py() >= cutoff:
                break
            yield batch, True
            done += batch.num_rows
        else:
            return
        # the rest without vectors, from the row group holding row ``done`` on (earlier ones are not read again)
        md = pf.metadata
        first, skip = 0, done
        while first < md.num_row_groups and skip >= md.row_group(first).num_rows:
            skip -= md.row_group(first).num_rows
            first += 1
        rest = range(first, md.num_row_groups)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["bucket", "example_id"], row_groups=rest):
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            yield (batch.slice(skip) if skip else batch), False
            skip = 0
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise _damaged(path, exc) from exc


def _vectors(batch) -> np.ndarray:
    col = batch.column("vector")
    d = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, d).astype(np.float64)


def _extents(paths: list[Path]) -> pl.DataFrame:
    """Per example: the largest position sampled in any of ``paths`` (sorted by example_id)."""
    if not paths:
        return pl.DataFrame(schema={"example_id": pl.Int64, "max_position": pl.Int64})
    return (pl.scan_parquet(paths).select("example_id", "position")
            .group_by("example_id").agg(pl.col("position").max().cast(pl.Int64).alias("max_position"))
            .sort("example_id").collect(engine="streaming"))


class _SplitScan:
    """Reads every config file of one split once and accumulates its statistics."""

    def __init__(self, root: Path, split: str, meta: dict):
        self.root, self.split, self.meta = root, split, meta
        self.sampling = _usable_sampling(meta)
        self.configs = _config_table(root, split)
        self.cutoff = _sample_cutoff([p for *_, p in self.configs], VECTOR_SAMPLE_ROWS)
        ext = _extents([p for *_, p in self.configs])
        self.ext_ids = ext.get_column("example_id").to_numpy()
        self.ext_max = ext.get_column("max_position").to_numpy()
        self.acc = _Tally()

    # -- one file
    def _scan(self, acc: _Tally, layer: int, head: int, kind: str, path: Path, keys: _Groups | None,
              want_groups: bool):
        lk = acc.layer_kind.setdefault((layer, kind), _LayerKind())
        n_rows, n_vec, norm_total = 0, 0, 0.0
        parts: list[_Groups] = []
        dot, pairs = 0.0, 0
        for batch, sampled in _batches_sampled(path, self.cutoff):
            if batch.num_rows == 0:
                continue
            bucket = batch.column("bucket").to_numpy(zero_copy_only=False).astype(np.int64)
            ex = batch.column("example_id").to_numpy(zero_copy_only=False).astype(np.int64)
            n_rows += batch.num_rows
            acc.count_rows(kind, bucket)
            if self.sampling is not None:
                _, hi = bucket_bounds(bucket, self.sampling)
                idx = np.searchsorted(self.ext_ids, ex)
                acc.count_rows(kind, bucket[self.ext_max[idx] > hi], covered=True)
            if not sampled:
                continue
            if self.cutoff is not None and ex[-1] >= self.cutoff:  # the batch that crosses the cutoff (rows sorted)
                keep = int(np.searchsorted(ex, self.cutoff))
                batch, bucket, ex = batch.slice(0, keep), bucket[:keep], ex[:keep]
                if batch.num_rows == 0:
                    continue
            vec = _vectors(batch)
            norms = np.sqrt(np.einsum("ij,ij->i", vec, vec))
            n_vec += batch.num_rows
            norm_total += float(norms.sum())
            lk.hist.add(bucket, norms)
            ub, inv = np.unique(bucket, return_inverse=True)
            cnt = np.bincount(inv)
            sums = np.bincount(inv, weights=norms)
            for b, c, s in zip(ub.tolist(), cnt.tolist(), sums.tolist()):
                lk.n[b] = lk.n.get(b, 0) + c
                lk.norm_sum[b] = lk.norm_sum.get(b, 0.0) + s
            if keys is not None or want_groups:
                ok = norms > 0
                unit = np.divide(vec, norms[:, None], out=np.zeros_like(vec), where=ok[:, None])
                g = _Groups.of(ex, bucket, unit, ok.astype(np.int64))
                if want_groups:
                    parts.append(g)
                if keys is not None and g.example_id.size and keys.example_id.size:
                    hit = g.frame("iq").join(keys.frame("ik"), on=["example_id", "bucket"], how="inner")
                    iq, ik = hit.get_column("iq").to_numpy(), hit.get_column("ik").to_numpy()
                    dot += float(np.einsum("ij,ij->", g.sums[iq], keys.sums[ik]))
                    pairs += int((g.count[iq] * keys.count[ik]).sum())
        acc.sampled_rows += n_vec
        acc.config_stats[path.parent.name] = {
            "layer": layer, "head": head, "kind": kind, "rows": n_rows, "vector_rows": n_vec,
            "mean_norm": norm_total / n_vec if n_vec else None,
        }
        groups = _Groups.concat(parts) if parts else None
        return groups, dot, pairs

    def run(self) -> None:
        """Every layer's files, a few layers at a time (pyarrow and numpy do most of it without the GIL); each
        layer tallies apart and the tallies are added up in layer order, so the result does not depend on timing."""
        layers = sorted({c[0] for c in self.configs})
        with ThreadPoolExecutor(max_workers=max(1, min(REPORT_WORKERS, len(layers)))) as pool:
            for tally in pool.map(self._layer, layers):
                self.acc.add(tally)

    def _layer(self, layer: int) -> _Tally:
        acc = _Tally()
        n_q, n_kv = self._head_counts()
        group = n_q // n_kv if n_q and n_kv and n_q % n_kv == 0 else None
        qs = {h: p for la, h, k, p in self.configs if la == layer and k == "q"}
        ks = {h: p for la, h, k, p in self.configs if la == layer and k == "k"}
        done_q: set[int] = set()
        for g, kpath in sorted(ks.items()):
            mine = sorted(h for h in qs if group is not None and h // group == g)
            groups, _, _ = self._scan(acc, layer, g, "k", kpath, None, want_groups=bool(mine))
            for h in mine:
                _, dot, pairs = self._scan(acc, layer, h, "q", qs[h], groups, want_groups=False)
                acc.cosine[(layer, h)] = {"kv_head": g, "pairs": pairs, "mean": dot / pairs if pairs else None}
                done_q.add(h)
            del groups
        for h, qpath in sorted(qs.items()):
            if h not in done_q:
                self._scan(acc, layer, h, "q", qpath, None, want_groups=False)
        return acc

    def _head_counts(self) -> tuple[int | None, int | None]:
        model = self.meta.get("model") or {}
        n_q, n_kv = model.get("num_heads"), model.get("num_kv_heads")
        if n_q and n_kv:
            return int(n_q), int(n_kv)
        return None, None  # which key head a query head reads is unknown: no cosine

    # -- results
    def result(self) -> dict:
        buckets = sorted(set(self.acc.rows["q"]) | set(self.acc.rows["k"]))
        n_cfg = {k: sum(1 for c in self.configs if c[2] == k) for k in KINDS}
        n_layers = {k: len({c[0] for c in self.configs if c[2] == k}) for k in KINDS}
        streams = dict(n_cfg) if (self.sampling or {}).get("per_head") else n_layers
        table = []
        ext_len = self.ext_max + 1
        for b in buckets:
            row: dict = {"bucket": b, "rows": {k: int(self.acc.rows[k].get(b, 0)) for k in KINDS}}
            if self.sampling is not None:
                lo, hi = (int(x[0]) for x in bucket_bounds([b], self.sampling))
                width = hi - lo + 1
                p = float(_keep_p([b], self.sampling)[0])
                in_bucket = float(np.clip(ext_len - lo, 0, width).sum())
                covered = int((self.ext_max > hi).sum())
                per_ex = width * p
                row.update({
                    "first_position": lo, "last_position": hi, "keep_probability": p,
                    "expected_rows": {k: in_bucket * p * n_cfg[k] for k in KINDS},
                    "covered_examples": covered,
                    "covered_rows": {k: int(self.acc.covered_rows[k].get(b, 0)) for k in KINDS},
                    "expected_rows_per_covered_example": per_ex,
                    "rows_per_covered_example": {
                        k: (self.acc.covered_rows[k].get(b, 0) / (covered * n_cfg[k]) if covered and n_cfg[k] else None)
                        for k in KINDS},
                    "standard_error": {
                        k: (math.sqrt(width * p * (1 - p) / (covered * streams[k])) if covered and streams[k] else None)
                        for k in KINDS},
                })
            table.append(row)
        norms: dict = {"q": {}, "k": {}}
        for (layer, kind), lk in sorted(self.acc.layer_kind.items()):
            qv = lk.hist.quantiles()
            norms[kind][layer] = {
                b: {"rows": int(lk.n[b]), "mean": lk.norm_sum[b] / lk.n[b], "q1": qv[b][0], "median": qv[b][1],
                    "q3": qv[b][2]}
                for b in sorted(lk.n) if lk.n[b]
            }
        mean_norm: dict = {"q": {}, "k": {}}
        for st in self.acc.config_stats.values():
            mean_norm[st["kind"]].setdefault(st["layer"], {})[st["head"]] = st["mean_norm"]
        cosine: dict = {}
        for (layer, h), c in sorted(self.acc.cosine.items()):
            cosine.setdefault(layer, {})[h] = c
        return {
            "sampling": self.sampling,
            "sampling_recorded": self.meta.get("sampling"),
            "metadata_source": self.meta.get("source"),
            "model": self.meta.get("model"),
            "dataset": self.meta.get("dataset"),
            "examples": int(self.ext_ids.size),
            "rows_total": int(sum(sum(v.values()) for v in self.acc.rows.values())),
            "vector_sample": {"example_id_below": self.cutoff, "rows": int(self.acc.sampled_rows)},
            "configs": dict(sorted(self.acc.config_stats.items())),
            "config_counts": n_cfg,
            "independent_streams": streams,
            "buckets": table,
            "norms": norms,
            "heads": {"mean_norm": mean_norm, "cosine": cosine},
        }


def chunk_timings(root: Path) -> list[dict]:
    """Examples, tokens and throughput of every complete staged chunk (sorted by chunk index)."""
    chunks, _ = scan_chunks(root)
    out = []
    for _, m in chunks:
        t = m.get("timings") or {}
        out.append({
            "chunk": m.get("chunk"), "split": m.get("split"), "examples": m.get("examples"),
            "tokens": m.get("tokens"), "computed_tokens": m.get("computed_tokens"),
            "rows": int(sum((m.get("rows") or {}).values())), "device": m.get("device"),
            "tokens_per_s": t.get("tokens_per_s"), "load_s": t.get("load_s"), "forward_s": t.get("forward_s"),
            "total_s": t.get("total_s"),
        })
    return out


def compute_stats(root: Path, split: str | None = None) -> dict:
    """Statistics of the final dataset under ``root`` (every split, or only ``split``) and of its staged chunks.

    ``{"root", "splits": {split: {...}}, "chunks": [...]}``; per split: ``sampling`` (None when the
    split's sampling settings are not recorded, or mixed), ``examples`` (distinct example ids),
    ``rows_total``, ``configs`` (name -> rows, mean norm), ``buckets`` (rows per kind, and with
    known sampling the expected rows and the covered-example check), ``norms`` (kind -> layer ->
    bucket -> rows, mean, q1, median, q3), ``heads`` (``mean_norm`` kind -> layer -> head, and
    ``cosine`` layer -> query head -> kv_head, pairs, mean). Bucket, layer and head keys are ints.
    """
    root = Path(root)
    out: dict = {"root": str(root), "splits": {}, "chunks": chunk_timings(root)}
    for s in _splits(root, split):
        scan = _SplitScan(root, s, split_metadata(root, s))
        scan.run()
        out["splits"][s] = scan.result()
        log.info("report: split %r: %d rows in %d configs", s, out["splits"][s]["rows_total"],
                 len(out["splits"][s]["configs"]))
    return out


# -- writing figures --------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _atomic_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file; returns False (and writes nothing) when unchanged."""
    path = Path(path)
    try:
        if path.is_file() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    with atomic_output(path) as fh:
        fh.write(data)
    return True


def save_figure(fig, base: Path, formats=FORMATS) -> list[Path]:
    """``base`` + ``.png`` / ``.svg``, byte-for-byte reproducible (no dates, fixed SVG ids), each atomic."""
    import matplotlib

    out = []
    for fmt in formats:
        buf = io.BytesIO()
        meta = {"Software": "qk-sniffer"} if fmt == "png" else {"Date": None, "Creator": "qk-sniffer"}
        with matplotlib.rc_context({"svg.hashsalt": "qk-sniffer", "svg.fonttype": "path"}):
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
        # the first save laid the figure out; later formats reuse that layout instead of solving it again
        fig.set_layout_engine("none")
        path = Path(f"{base}.{fmt}")
        _atomic_bytes(path, buf.getvalue())
        out.append(path)
    return out


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _bucket_label(sampling: dict | None) -> str:
    if not sampling:
        return "position bucket"
    if sampling["type"] == "log_uniform":
        return "position bucket b (positions 2^b-1 .. 2^(b+1)-2)"
    return f"position bucket b (positions {sampling.get('min_bucket_size')}*b ..)"


def _draw_rows(ax, st: dict, *, compact: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    """Bars of rows per bucket and kind; the expected counts where ``st``'s buckets carry them, and for
    log_uniform the ``base_rate x examples x configs`` line (what full buckets hold)."""
    table = st["buckets"]
    if not table:
        _no_data(ax, "no rows")
        return
    x = np.arange(len(table))
    w = 0.4
    for i, k in enumerate(KINDS):
        vals = np.array([r["rows"][k] for r in table], dtype=float)
        ax.bar(x + (i - 0.5) * w, np.where(vals > 0, vals, np.nan), width=w, color=KIND_COLOR[k],
               label=f"{KIND_LABEL[k]} ({st['config_counts'][k]} configs)")
        if st["config_counts"][k] and all("expected_rows" in r for r in table):
            exp = np.array([r["expected_rows"][k] for r in table], dtype=float)
            ax.plot(x + (i - 0.5) * w, np.where(exp > 0, exp, np.nan), ls="none", marker="_", ms=14, mew=2,
                    color="black", label="expected, lower bound (examples end at their last sampled token)"
                    if i == 0 else None)
    smp = st["sampling"]
    if smp is not None and smp["type"] == "log_uniform" and st["examples"]:
        for k in KINDS:
            if st["config_counts"][k]:
                line = float(smp["base_rate"]) * st["examples"] * st["config_counts"][k]
                ax.axhline(line, color=KIND_COLOR[k], ls=":", lw=1.2,
                           label=f"base_rate x examples x {KIND_SINGULAR[k]} configs = {line:,.0f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    step = max(1, math.ceil(len(table) / 24))
    ax.set_xticks(x[::step], [str(r["bucket"]) for r in table][::step])
    ax.set_xlabel("position bucket" if compact else _bucket_label(smp))
    ax.set_ylabel("rows (all configs of a kind)")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=7 if compact else 8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if compact else -0.16),
              ncol=2, frameon=False)


def _draw_check(ax, st: dict) -> None:
    table = [r for r in st["buckets"] if r.get("covered_examples")]
    if st["sampling"] is None:
        _no_data(ax, "sampling settings not recorded for this split\n(or rows of several samplings): no check")
        return
    if not table:
        _no_data(ax, "no bucket is fully inside any example")
        return
    x = np.arange(len(table))
    for i, k in enumerate(KINDS):
        if not st["config_counts"][k]:
            continue
        ratio = np.array([np.nan if r["rows_per_covered_example"][k] is None
                          else r["rows_per_covered_example"][k] / r["expected_rows_per_covered_example"]
                          for r in table])
        err = np.array([np.nan if r["standard_error"][k] is None
                        else 2 * r["standard_error"][k] / r["expected_rows_per_covered_example"] for r in table])
        ax.errorbar(x + (i - 0.5) * 0.2, ratio, yerr=err, fmt="o", ms=4, capsize=3, color=KIND_COLOR[k],
                    label=f"{KIND_LABEL[k]} (bars: 2 standard errors)")
    ax.axhline(1.0, color="black", lw=1)
    step = max(1, math.ceil(len(table) / 16))
    ax.set_xticks(x[::step], [f"{r['bucket']}\n{r['covered_examples']}" for r in table][::step])
    ax.set_xlabel("bucket / examples covering it")
    ax.set_ylabel("observed / expected rows per example")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)


def _title(split: str, st: dict, vectors: bool = False) -> str:
    """The figure title; ``vectors``: the figure shows vector statistics, so it names their sample when bounded."""
    model = (st.get("model") or {}).get("name")
    smp = st.get("sampling") or {}
    bits = [f"split {split}"]
    if model:
        bits.append(str(model))
    if smp:
        bits.append(f"{smp['type']} sampler, base_rate {smp['base_rate']:g}, min_bucket_size {smp['min_bucket_size']}")
    sample = st.get("vector_sample") or {}
    if vectors and sample.get("example_id_below") is not None:
        bits.append(f"vectors of examples with id < {sample['example_id_below']} ({sample['rows']:,} rows)")
    return " | ".join(bits)


def render_rows_per_bucket(split: str, st: dict, base: Path, formats=FORMATS) -> list[Path]:
    fig = _figure(11, 5.0)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    _draw_rows(ax1, st)
    ax1.set_title("sampled rows per bucket", fontsize=10)
    _draw_check(ax2, st)
    ax2.set_title("rows per covering example, observed / expected", fontsize=10)
    fig.suptitle(_title(split, st), fontsize=10)
    return save_figure(fig, base, formats)


def render_norms(split: str, st: dict, kind: str, base: Path, formats=FORMATS) -> list[Path]:
    per_layer = st["norms"][kind]
    layers = sorted(per_layer)
    if len(layers) <= MAX_PANELS:
        ncols = min(4, max(1, len(layers)))
        nrows = max(1, math.ceil(len(layers) / ncols))
        fig = _figure(3.0 * ncols + 0.6, 2.3 * nrows + 0.8)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
        for ax, layer in zip(axes, layers):
            d = per_layer[layer]
            bs = sorted(d)
            med = [d[b]["median"] for b in bs]
            ax.fill_between(bs, [d[b]["q1"] for b in bs], [d[b]["q3"] for b in bs], color=KIND_COLOR[kind], alpha=0.25,
                            lw=0, label="quartiles")
            ax.plot(bs, med, color=KIND_COLOR[kind], marker="o", ms=3, lw=1.5, label="median")
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes[len(layers):]:
            ax.set_visible(False)
        if not layers:
            axes[0].set_visible(True)
            _no_data(axes[0], f"no {KIND_LABEL[kind]} captured")
        else:
            axes[0].legend(fontsize=7)
        fig.supxlabel(_bucket_label(st.get("sampling")), fontsize=9)
        fig.supylabel(f"{KIND_SINGULAR[kind]} vector norm", fontsize=9)
    else:
        from matplotlib import cm, colors

        fig = _figure(10, 4.5)
        ax1, ax2 = fig.subplots(1, 2)
        norm = colors.Normalize(vmin=min(layers), vmax=max(layers))
        cmap = cm.viridis
        for layer in layers:
            d = per_layer[layer]
            bs = sorted(d)
            ax1.plot(bs, [d[b]["median"] for b in bs], color=cmap(norm(layer)), lw=1)
            ax2.plot(bs, [d[b]["q3"] / d[b]["q1"] if d[b]["q1"] > 0 else np.nan for b in bs], color=cmap(norm(layer)),
                     lw=1)
        ax1.set_ylabel(f"median {KIND_SINGULAR[kind]} norm")
        ax2.set_ylabel("upper / lower quartile")
        for ax in (ax1, ax2):
            ax.set_xlabel(_bucket_label(st.get("sampling")))
            ax.grid(alpha=0.3)
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax2, label="layer")
    fig.suptitle(f"{KIND_LABEL[kind]} norms by position bucket | {_title(split, st, vectors=True)}", fontsize=10)
    return save_figure(fig, base, formats)


def _heat(fig, ax, grid: dict, title: str, xlabel: str, *, diverging: bool = False) -> None:
    from matplotlib import colormaps

    layers = sorted(grid)
    heads = sorted({h for v in grid.values() for h in v})
    if not layers or not heads:
        _no_data(ax, "not captured")
        ax.set_title(title, fontsize=9)
        return
    m = np.full((len(layers), len(heads)), np.nan)
    for i, la in enumerate(layers):
        for j, h in enumerate(heads):
            v = grid[la].get(h)
            if v is not None:
                m[i, j] = v
    cmap = colormaps["RdBu_r" if diverging else "viridis"].with_extremes(bad="0.85")
    lim = 1.0
    if diverging:
        lim = max(0.05, float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto", interpolation="nearest")
    step_x = max(1, len(heads) // 16)
    step_y = max(1, len(layers) // 20)
    ax.set_xticks(np.arange(len(heads))[::step_x], [str(h) for h in heads][::step_x])
    ax.set_yticks(np.arange(len(layers))[::step_y], [str(la) for la in layers][::step_y])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if m.size <= ANNOTATE_CELLS:
        finite = m[np.isfinite(m)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    light = abs(m[i, j]) > lim * 0.5 if diverging else m[i, j] < mid
                    ax.text(j, i, f"{m[i, j]:.2f}" if diverging else f"{m[i, j]:.3g}", ha="center", va="center",
                            fontsize=7, color="white" if light else "black")
    fig.colorbar(im, ax=ax, shrink=0.85)


def render_heads(split: str, st: dict, base: Path, formats=FORMATS) -> list[Path]:
    heads = st["heads"]
    n_q = max((len(v) for v in heads["mean_norm"]["q"].values()), default=1)
    n_layers = max(len(heads["mean_norm"]["q"]), len(heads["mean_norm"]["k"]), 1)
    fig = _figure(min(22, 6 + 1.1 * max(n_q, 4) * 1.2), min(14, 2.2 + 0.32 * n_layers))
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[max(n_q, 1), max(1, max((len(v) for v in
                                 heads["mean_norm"]["k"].values()), default=1)), max(n_q, 1)])
    _heat(fig, ax1, heads["mean_norm"]["q"], "mean query norm", "query head")
    _heat(fig, ax2, heads["mean_norm"]["k"], "mean key norm", "key/value head")
    cos = {la: {h: c["mean"] for h, c in v.items()} for la, v in heads["cosine"].items()}
    _heat(fig, ax3, cos, "mean cos(q of head h, k of its key head)\nsame example, same bucket", "query head h",
          diverging=True)
    fig.suptitle(_title(split, st, vectors=True), fontsize=10)
    return save_figure(fig, base, formats)


def render_chunk_timings(chunks: list[dict], base: Path, formats=FORMATS) -> list[Path]:
    fig = _figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    if not chunks:
        _no_data(ax1, "no staged chunk manifests under staging/")
        _no_data(ax2, "no staged chunk manifests under staging/")
    else:
        x = np.arange(len(chunks))
        labels = [str(c["chunk"]) for c in chunks]
        tps = np.array([c["tokens_per_s"] if c["tokens_per_s"] is not None else np.nan for c in chunks], dtype=float)
        bars = ax1.bar(x, tps, color="#4c8c4a")
        for rect, c in zip(bars, chunks):
            ax1.annotate(f"{c['tokens'] or 0:,} tok\n{c['examples'] or 0:,} ex", (rect.get_x() + rect.get_width() / 2,
                         rect.get_height() if np.isfinite(rect.get_height()) else 0), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 2), textcoords="offset points")
        if np.isfinite(tps).any():
            ax1.set_ylim(0, float(np.nanmax(tps)) * 1.25)
        ax1.set_xticks(x, labels)
        ax1.set_xlabel("chunk")
        ax1.set_ylabel("tokens / s (forward pass)")
        ax1.set_title("throughput per chunk", fontsize=10)
        ax1.grid(axis="y", alpha=0.3)
        load = np.array([c["load_s"] or 0 for c in chunks], dtype=float)
        fwd = np.array([c["forward_s"] or 0 for c in chunks], dtype=float)
        ax2.bar(x, load, color="0.6", label="load (data, tokenizer, model)")
        ax2.bar(x, fwd, bottom=load, color="#4c8c4a", label="forward + capture + write")
        ax2.set_xticks(x, labels)
        ax2.set_xlabel("chunk")
        ax2.set_ylabel("seconds")
        ax2.set_title("time per chunk", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
        devices = sorted({str(c["device"]) for c in chunks})
        fig.suptitle(f"{len(chunks)} chunks on {', '.join(devices)}", fontsize=10)
    return save_figure(fig, base, formats)


# -- the metadata table -------------------------------------------------------------------------


def _cell(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


def metadata_rows(split: str, st: dict, meta: dict) -> list[tuple[str, str, str]]:
    """(section, key, value) rows of the metadata table of one split."""
    rows: list[tuple[str, str, str]] = []
    model = st.get("model") or {}
    for key in ("name", "revision", "dtype", "attn_implementation", "num_layers", "num_heads", "num_kv_heads",
                "head_dim"):
        if key in model:
            rows.append(("model", key, _cell(model[key])))
    windows = meta.get("layer_windows")
    if windows and any(w is not None for w in windows):
        rows.append(("model", "sliding windows", ", ".join(f"layer {i}: {w}" for i, w in enumerate(windows) if w)))
    for key, v in (st.get("dataset") or {}).items():
        rows.append(("dataset", key, _cell(v)))
    for key, v in (st.get("sampling_recorded") or {}).items():
        rows.append(("sampler", key, _cell(v)))
    if meta.get("mixed_sampling") or meta.get("previous_sampling"):
        rows.append(("sampler", "warning", "rows of this split were captured with several sampling settings"))
    rows += [
        ("data", "rows", _cell(st["rows_total"])),
        ("data", "configs", f"{len(st['configs'])} ({st['config_counts']['q']} query, {st['config_counts']['k']} key)"),
        ("data", "examples with rows", _cell(st["examples"])),
        ("data", "vector statistics over", "every row" if (st.get("vector_sample") or {}).get("example_id_below") is None
         else f"examples with id < {st['vector_sample']['example_id_below']} ({st['vector_sample']['rows']} rows)"),
        ("data", "metadata read from", _cell(st.get("metadata_source"))),
    ]
    timings = (meta.get("run") or {}).get("timings") or {}
    for key in ("chunks", "examples", "tokens", "computed_tokens", "load_s", "forward_s", "total_s", "tokens_per_s"):
        if key in timings:
            rows.append(("this run", key, _cell(timings[key])))
    run = meta.get("run") or {}
    if run.get("devices"):
        rows.append(("this run", "devices", ", ".join(map(str, run["devices"]))))
    for key, v in sorted((run.get("versions") or {}).items()):
        rows.append(("versions", key, _cell(v)))
    return rows


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 14px; margin: 1em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th.section { background: #eef2f6; }
td.value { font-family: ui-monospace, monospace; }
"""


def render_metadata_html(stats: dict, metas: dict[str, dict], path: Path) -> Path:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>qk-sniffer run metadata</title>',
             f"<style>{_HTML_STYLE}</style></head><body>", "<h1>qk-sniffer: model, dataset and sampler</h1>"]
    if not stats["splits"]:
        parts.append("<p>The final dataset has no rows yet.</p>")
    for split, st in stats["splits"].items():
        parts.append(f"<h2>split <code>{html.escape(split)}</code></h2>")
        parts.append("<table><tbody>")
        section = None
        for sec, key, value in metadata_rows(split, st, metas.get(split, {})):
            if sec != section:
                parts.append(f'<tr><th class="section" colspan="2">{html.escape(sec)}</th></tr>')
                section = sec
            parts.append(f'<tr><td>{html.escape(key)}</td><td class="value">{html.escape(value)}</td></tr>')
        parts.append("</tbody></table>")
    if stats["chunks"]:
        cols = ["chunk", "split", "examples", "tokens", "rows", "device", "tokens_per_s", "load_s", "forward_s",
                "total_s"]
        parts.append("<h2>staged chunks</h2><table><thead><tr>"
                     + "".join(f"<th>{c}</th>" for c in cols) + "</tr></thead><tbody>")
        for c in stats["chunks"]:
            parts.append("<tr>" + "".join(f'<td class="value">{html.escape(_cell(c.get(k)))}</td>' for k in cols)
                         + "</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


# -- entry points -------------------------------------------------------------------------------


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


def _bucket_rows(paths: list[Path]) -> dict[int, int]:
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
    splits = _splits(root, split)
    panels = []
    for s in splits:
        configs = _config_table(root, s)
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
            "sampling": _usable_sampling(meta),
            "model": meta.get("model"),
        }))
    n = max(1, len(panels))
    fig = _figure(6.4, 3.4 * n + 0.3)
    axes = np.atleast_1d(fig.subplots(n, 1, squeeze=False)).ravel()
    if not panels:
        _no_data(axes[0], "no rows yet")
    for ax, (s, st) in zip(axes, panels):
        _draw_rows(ax, st, compact=True)
        ax.set_title(f"{s}: rows per position bucket (all layers and heads)", fontsize=9)
    path = final_dir(root) / CARD_FIGURE
    save_figure(fig, path.with_suffix(""), formats=("png",))
    return path
