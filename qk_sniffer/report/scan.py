"""One pass over a split's config files: rows per bucket over every row, vector statistics over a bounded
prefix of the examples (the package docstring, ``qk_sniffer.report``, says what and why), and
:func:`compute_stats`, the numbers behind every figure and ``stats.json``.

Files are read one record batch at a time (``BATCH_ROWS`` rows); a few layers are scanned at once
(``REPORT_WORKERS`` threads), each into its own :class:`Tally`, added up in layer order.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from .accumulators import LayerKind, Tally, UnitVectorGroups
from .buckets import bucket_bounds, keep_p, usable_sampling
from .sources import KINDS, chunk_timings, config_table, damaged, selected_splits, split_metadata

log = logging.getLogger("qk_sniffer")

BATCH_ROWS = 65536
VECTOR_SAMPLE_ROWS = 1 << 16  # rows of the largest config whose vectors the norm and cosine statistics read
REPORT_WORKERS = min(4, os.cpu_count() or 1)  # layers scanned at once

def _read_batches(path: Path, columns: list[str]):
    """Record batches of ``columns`` of ``path``; a file that cannot be decoded is a ``ReportError``."""
    try:
        pf = pq.ParquetFile(path)
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise damaged(path, exc) from exc


def _sample_cutoff(paths: list[Path], limit: int) -> int | None:
    """The example id below which vectors are read: the id at row ``limit`` of the largest file (None: all)."""
    sizes = []
    for p in paths:
        try:
            sizes.append((pq.ParquetFile(p).metadata.num_rows, p))
        except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
            raise damaged(p, exc) from exc
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
        raise damaged(path, exc) from exc


def _vectors(batch) -> np.ndarray:
    """The batch's ``vector`` column as a float64 (rows x head_dim) array."""
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


class SplitScan:
    """Reads every config file of one split once and accumulates its statistics."""

    def __init__(self, root: Path, split: str, meta: dict):
        self.root, self.split, self.meta = root, split, meta
        self.sampling = usable_sampling(meta)
        self.configs = config_table(root, split)
        self.cutoff = _sample_cutoff([p for *_, p in self.configs], VECTOR_SAMPLE_ROWS)
        ext = _extents([p for *_, p in self.configs])
        self.ext_ids = ext.get_column("example_id").to_numpy()
        self.ext_max = ext.get_column("max_position").to_numpy()
        self.acc = Tally()

    # -- one file
    def _scan(self, acc: Tally, layer: int, head: int, kind: str, path: Path, keys: UnitVectorGroups | None,
              want_groups: bool):
        """Add one config file to ``acc``; returns its unit-vector groups (``want_groups``) and, given the groups
        of its key head (``keys``), the summed cosines and the number of query-key pairs behind them."""
        lk = acc.layer_kind.setdefault((layer, kind), LayerKind())
        n_rows, n_vec, norm_total = 0, 0, 0.0
        parts: list[UnitVectorGroups] = []
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
                g = UnitVectorGroups.of(ex, bucket, unit, ok.astype(np.int64))
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
        groups = UnitVectorGroups.concat(parts) if parts else None
        return groups, dot, pairs

    def run(self) -> None:
        """Every layer's files, a few layers at a time (pyarrow and numpy do most of it without the GIL); each
        layer tallies apart and the tallies are added up in layer order, so the result does not depend on timing."""
        layers = sorted({c[0] for c in self.configs})
        with ThreadPoolExecutor(max_workers=max(1, min(REPORT_WORKERS, len(layers)))) as pool:
            for tally in pool.map(self._layer, layers):
                self.acc.add(tally)

    def _layer(self, layer: int) -> Tally:
        """One layer's files: each key head, then the query heads that read it (their cosines), then the rest."""
        acc = Tally()
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
        """Query and key/value heads per layer, as recorded for the model (None, None: not recorded)."""
        model = self.meta.get("model") or {}
        n_q, n_kv = model.get("num_heads"), model.get("num_kv_heads")
        if n_q and n_kv:
            return int(n_q), int(n_kv)
        return None, None  # which key head a query head reads is unknown: no cosine

    # -- results
    def result(self) -> dict:
        """The split's entry of :func:`compute_stats` from what :meth:`run` added up."""
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
                p = float(keep_p([b], self.sampling)[0])
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
    for s in selected_splits(root, split):
        scan = SplitScan(root, s, split_metadata(root, s))
        scan.run()
        out["splits"][s] = scan.result()
        log.info("report: split %r: %d rows in %d configs", s, out["splits"][s]["rows_total"],
                 len(out["splits"][s]["configs"]))
    return out
