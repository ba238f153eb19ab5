"""``sniff-qk verify DATA_ROOT``: check a data root's dataset, card and staged chunks, changing nothing.

Checks, a few files at a time (``VERIFY_WORKERS``) with bounded memory (record batches of one row
group at most per file):

- every ``final/data/<split>/<config>/data.parquet`` is readable Parquet with exactly the dataset
  schema (``writer.row_schema``; all files of a split agree on head dimension, vector dtype and
  ``token_str``); split and config names are valid; keys ``(example_id, position)`` are unique and
  sorted; ``layer``/``head``/``kind`` are constant and equal to the path's; positions are >= 0;
  no vector is null; ``sliding_window`` is constant; every bucket is the one the recorded sampler
  gives its position; and, for a bounded random subset of rows, the frozen sampler selects the row;
- ``final/README.md``: the front matter parses and its ``configs:`` list matches the files exactly,
  aggregates included (globs are expanded against the files on disk);
- ``staging/chunk-*/manifest.json``: parses, and every staged file it lists has exactly the row
  count it records (from the Parquet footer) and is the file the chunk wrote (size and footer
  digest, as recorded for the merge). A chunk without a manifest is unfinished, not corrupt: it
  is a warning;
- no leftover temporary or hidden files under ``final/``.

A data root (or its ``final/``) holding a dataset of the original tool (:mod:`qk_sniffer.legacy`) is one problem,
and nothing else is checked. A split migrated from it (``sniff-qk migrate``) has no sampler to check its rows against.

The sampler of a split is the one recorded in ``final/README.md`` (``qk_sniffer.splits.<split>.sampling``,
plus ``previous_sampling`` when rows were appended with other settings), else ``final/.merged.json``,
else the config passed in (for its own split). Without any, bucket and selection checks are skipped
and the report says so.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .layout import CONFIG_RE, final_dir, staging_dir
from .legacy import is_original_sampling, local_problem
from .parquet import KEYS, matches_summary, offset_map, read_footer
from .sampling import KIND_CODE, MASK64, SHARED_HEAD, SamplerSpec, bucket_of, keep_probability, mix, mix_int, u_array
from .writer import row_schema

SPLIT_RE = re.compile(r"\w+(\.\w+)*")
CHUNK_DIR_RE = re.compile(r"chunk-(\d+)")
# hidden names that belong in final/ (pull and merge targets, the Hub's attributes file, a download cache)
ALLOWED_HIDDEN = {".snapshot.json", ".merged.json", ".gitattributes", ".cache"}
SAMPLE_ROWS = 2000  # rows per file whose sampling decision is recomputed
VERIFY_WORKERS = min(4, os.cpu_count() or 1)  # files streamed at once: memory holds this many record batches
BATCH_ROWS = 65536
# read column chunks through a small buffer instead of pre-buffering the whole file: memory stays at about one
# record batch (pyarrow's default pre-buffers every row group it is asked for)
STREAM = {"pre_buffer": False, "buffer_size": 1 << 20}
NAMED = 3  # file names or keys quoted per problem line
ORIGINAL_ROWS = "it holds rows migrated from the original qk-sniffer tool, whose sampler was not recorded"
REBUILD = ("rebuild it: delete it and rerun the chunks that produced it, then merge (or pull it from the remote "
           "again after deleting final/.snapshot.json)")

_AGGREGATES = [
    (re.compile(r"all"), lambda m, p: True),
    (re.compile(r"all_([qk])"), lambda m, p: p[2] == m.group(1)),
    (re.compile(r"layer(\d{2,})"), lambda m, p: p[0] == m.group(1)),
    (re.compile(r"layer(\d{2,})_([qk])"), lambda m, p: p[0] == m.group(1) and p[2] == m.group(2)),
    (re.compile(r"l(\d{2,})h(\d{2,})"), lambda m, p: p[0] == m.group(1) and p[1] == m.group(2)),
]


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` make ``ok`` false; ``warnings`` do not."""

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=lambda: {
        "splits": 0, "configs": 0, "files": 0, "rows": 0, "chunks": 0, "staged_files": 0, "sampled_rows": 0,
    })

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        c = self.checked
        state = "OK" if self.ok else "FAILED"
        counts = (f"{c['splits']} split(s), {c['configs']} config(s), {c['files']} file(s), {c['rows']:,} rows, "
                  f"{c['chunks']} staged chunk(s) with {c['staged_files']} file(s); sampling decision of "
                  f"{c['sampled_rows']:,} rows recomputed")
        return (f"verify {self.root}: {state}: {len(self.problems)} problem(s), {len(self.warnings)} warning(s) "
                f"({counts})")

    def format(self) -> str:
        lines = [self.summary()]
        if self.problems:
            lines += ["problems:"] + [f"  - {p}" for p in self.problems]
        if self.warnings:
            lines += ["warnings:"] + [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------


def _named(items, n: int = NAMED) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _hidden(rel: str) -> bool:
    """Names ``datasets`` skips when it resolves data files (dot-files, ``__``-prefixed)."""
    return any(part.startswith((".", "__")) for part in PurePosixPath(rel).parts)


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, str(exc)
    if not isinstance(data, dict):
        return None, f"the top level is a {type(data).__name__}, not an object"
    return data, None


def sampler_u(spec: SamplerSpec, example_id: np.ndarray, layer: int, head: int, kind: str,
              position: np.ndarray) -> np.ndarray:
    """``token_u`` (sampling.py) for many rows of one config at once, composed from the frozen mixer."""
    ex = np.ascontiguousarray(example_id, dtype=np.int64).view(np.uint64)
    h = mix(np.full(ex.shape, mix_int(int(spec.seed) & MASK64), dtype=np.uint64) ^ ex)
    hv = head if spec.per_head else SHARED_HEAD
    for v in (layer, hv, KIND_CODE[kind]):
        h = mix(h ^ np.uint64(int(v) & MASK64))
    return u_array(h, np.ascontiguousarray(position, dtype=np.int64).view(np.uint64))


def _spec(rec: dict) -> SamplerSpec:
    missing = [k for k in ("type", "base_rate", "seed", "min_bucket_size") if k not in rec]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    spec = SamplerSpec(type=str(rec["type"]), base_rate=float(rec["base_rate"]), seed=int(rec["seed"]),
                       per_head=bool(rec.get("per_head", False)), min_bucket_size=int(rec["min_bucket_size"]))
    if spec.type not in ("log_uniform", "uniform", "all") or spec.min_bucket_size < 1:
        raise ValueError(f"has type {spec.type!r} and min_bucket_size {spec.min_bucket_size}")
    return spec


def _describe_spec(spec: SamplerSpec) -> str:
    return (f"{spec.type}, base_rate {spec.base_rate:g}, seed {spec.seed}, per_head {spec.per_head}, "
            f"min_bucket_size {spec.min_bucket_size}")


# -- the checker ------------------------------------------------------------------------------


class _Verifier:
    def __init__(self, root: Path, cfg: dict | None, sample_rows: int | None):
        self.root = Path(root)
        self.final = final_dir(self.root)
        self.cfg = cfg
        self.sample_rows = sample_rows
        self.report = VerifyReport(root=self.root)
        self.front: dict | None = None  # README front matter when it parses
        self.merged: dict | None = None

    # reporting
    def rel(self, path: Path) -> str:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def problem(self, path: Path | str, what: str) -> None:
        where = self.rel(path) if isinstance(path, Path) else path
        self.report.problems.append(f"{where}: {what}")

    def warn(self, path: Path | str, what: str) -> None:
        where = self.rel(path) if isinstance(path, Path) else path
        self.report.warnings.append(f"{where}: {what}")

    # -- entry ---------------------------------------------------------------------------------
    def run(self) -> VerifyReport:
        if not self.root.is_dir():
            self.problem(str(self.root), "is not a directory; pass a data root (output.data_root, default "
                                         "data/<name>)")
            return self.report
        original = local_problem(self.root)  # a dataset of the original tool: one line, not one per file
        if original is not None:
            self.report.problems.append(original)
            return self.report
        if not self.final.is_dir() and not staging_dir(self.root).is_dir():
            self.problem(str(self.root), "has neither final/ nor staging/: it is not a data root (or nothing ran "
                                         "yet); pass output.data_root of the config")
            return self.report
        self._load_records()
        self._check_stray()
        layout = self._scan_layout()
        for split in sorted(layout):
            self._check_split(split, layout[split])
        self.report.checked["splits"] = len(layout)
        self.report.checked["configs"] = len({c for cfgs in layout.values() for c in cfgs})
        self._check_readme(layout)
        self._check_staging()
        return self.report

    def _load_records(self) -> None:
        readme = self.final / "README.md"
        if readme.is_file():
            from .readme import ReadmeError, read_front_matter

            try:
                self.front, _ = read_front_matter(readme)
            except (ReadmeError, OSError, UnicodeDecodeError) as exc:
                self.problem(readme, f"cannot be read ({exc}); render it again (sniff-qk render-readme --config ...)")
        merged = self.final / ".merged.json"
        if merged.is_file():
            self.merged, err = _read_json(merged)
            if err:
                self.problem(merged, f"is not readable JSON ({err}); rerun merge to rewrite it")

    # -- stray files ---------------------------------------------------------------------------
    def _check_stray(self) -> None:
        if not self.final.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.final):
            top = Path(dirpath) == self.final
            keep = []
            for d in sorted(dirnames):
                if top and d in ALLOWED_HIDDEN:
                    continue
                if d.startswith(".") or ".tmp" in d:
                    self.problem(Path(dirpath) / d, "a hidden or temporary directory left in final/; if no stage is "
                                                    "running, delete it")
                    continue
                keep.append(d)
            dirnames[:] = keep
            for name in sorted(filenames):
                if top and name in ALLOWED_HIDDEN:
                    continue
                if name.startswith(".") or ".tmp" in name:
                    self.problem(Path(dirpath) / name, "a temporary or hidden file left by an interrupted write; if "
                                                       "no stage is running, delete it")

    # -- layout --------------------------------------------------------------------------------
    def _scan_layout(self) -> dict[str, dict[str, Path]]:
        """Split -> config -> data file; reports names and files that are not part of the layout."""
        base = self.final / "data"
        out: dict[str, dict[str, Path]] = {}
        if not base.is_dir():
            if self.final.is_dir():
                self.warn(base, "does not exist: the dataset has no data files yet")
            return out
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                continue  # reported by the stray check
            if not entry.is_dir():
                self.problem(entry, "unexpected file: final/data/ holds one directory per split; move or delete it")
                continue
            if not SPLIT_RE.fullmatch(entry.name):
                self.problem(entry, f"split name {entry.name!r} is not valid for datasets (letters, digits, _ and "
                                    "inner dots only, ^\\w+(\\.\\w+)*$); rename the directory and render the README "
                                    "again, and set output.split_name to the new name")
            configs: dict[str, Path] = {}
            for d in sorted(entry.iterdir()):
                if d.name.startswith("."):
                    continue
                if not d.is_dir():
                    self.problem(d, "unexpected file: a split directory holds one directory per config; move or "
                                    "delete it")
                    continue
                if not CONFIG_RE.match(d.name):
                    self.problem(d, f"{d.name!r} is not a config name (lLLhHHq or lLLhHHk); move or delete it")
                    continue
                for f in sorted(d.iterdir()):
                    if f.name.startswith(".") or f.name == "data.parquet":
                        continue
                    glob = " (load_dataset's *.parquet globs read it as part of this config)" \
                        if f.name.endswith(".parquet") else ""
                    self.problem(f, f"unexpected file in a config directory{glob}; move or delete it")
                data = d / "data.parquet"
                if data.is_file():
                    configs[d.name] = data
                else:
                    self.warn(d, "config directory without data.parquet; delete it")
            if configs:
                out[entry.name] = configs
            else:
                self.warn(entry, "split directory without data files")
        return out

    # -- sampling records ----------------------------------------------------------------------
    def _split_meta(self, split: str) -> dict | None:
        """``qk_sniffer: splits: <split>:`` of the README front matter (run metadata), if recorded."""
        own = (self.front or {}).get("qk_sniffer")
        splits = own.get("splits") if isinstance(own, dict) else None
        meta = splits.get(split) if isinstance(splits, dict) else None
        return meta if isinstance(meta, dict) else None

    def _samplers(self, split: str) -> tuple[list[SamplerSpec] | None, str]:
        """Every sampler recorded for ``split`` (rows must fit one of them), and where they came from."""
        specs: list[SamplerSpec] = []
        sources: list[str] = []
        readme = self.final / "README.md"
        meta = self._split_meta(split)
        if isinstance(meta, dict) and meta.get("sampling"):
            recs = [meta["sampling"], *(meta.get("previous_sampling") or [])]
            if any(is_original_sampling(rec) for rec in recs):
                return None, ORIGINAL_ROWS
            for rec in recs:
                try:
                    specs.append(_spec(rec if isinstance(rec, dict) else {}))
                except (ValueError, TypeError) as exc:
                    self.problem(readme, f"the sampling recorded for split {split!r} ({rec!r}) {exc}; render the "
                                         "README again")
            sources.append("final/README.md")
        merged = self.merged if self.merged and self.merged.get("split") == split else None
        if merged and merged.get("sampling"):
            mixed = merged.get("mixed_sampling")
            if mixed and not specs:
                return None, (".merged.json records that rows were appended with other sampling settings but "
                              "final/README.md records no history of them")
            recs = [merged["sampling"]] + ([mixed.get("recorded")] if isinstance(mixed, dict) else [])
            if any(is_original_sampling(rec) for rec in recs):
                return None, ORIGINAL_ROWS
            for rec in recs:
                try:
                    specs.append(_spec(rec if isinstance(rec, dict) else {}))
                except (ValueError, TypeError) as exc:
                    self.problem(self.final / ".merged.json", f"the sampling recorded for split {split!r} ({rec!r}) "
                                                              f"{exc}; rerun merge")
            sources.append("final/.merged.json")
        if not sources and self.cfg is not None:
            from .config import sampling_settings, split_name

            if split_name(self.cfg) == split:
                specs.append(_spec(sampling_settings(self.cfg)))
                sources.append("the config")
        if not sources:
            return None, "neither final/README.md nor final/.merged.json records its sampler (and no config for it " \
                         "was given)"
        return list(dict.fromkeys(specs)), " and ".join(sources)

    # -- data files ----------------------------------------------------------------------------
    def _check_split(self, split: str, configs: dict[str, Path]) -> None:
        specs, source = self._samplers(split)
        if specs is None:
            self.warn(f"final/data/{split}", f"bucket and sampling checks skipped: {source}")
        elif not specs:
            self.warn(f"final/data/{split}", "bucket and sampling checks skipped: the recorded sampler is unusable")
            specs = None
        # pass 1: footers only (one file open at a time: a large model has thousands of configs)
        signatures: dict[str, tuple[int, str, bool]] = {}
        num_rows: dict[str, int] = {}
        for name, path in configs.items():
            self.report.checked["files"] += 1
            try:
                with pq.ParquetFile(path) as pf:
                    schema, num_rows[name] = pf.schema_arrow, pf.metadata.num_rows
            except Exception as exc:  # noqa: BLE001 - any failure to open means a damaged file
                self.problem(path, f"is not readable Parquet ({type(exc).__name__}: {exc}); {REBUILD}")
                continue
            sig = self._check_schema(path, schema)
            if sig is not None:
                signatures[name] = sig
        if signatures:
            counts = Counter(signatures.values())
            order = list(signatures.values())
            ref = max(counts, key=lambda s: (counts[s], -order.index(s)))  # the most common; ties: the first
            ref_file = next(configs[n] for n, s in signatures.items() if s == ref)
            for name, sig in signatures.items():
                if sig != ref:
                    self.problem(configs[name], f"has {_sig(sig)} but the other files of split {split!r} have "
                                                f"{_sig(ref)} (e.g. {self.rel(ref_file)}); a split holds one model "
                                                f"captured with one setting: {REBUILD}, or write it to another split")
        # pass 2: the rows, streamed file by file, a few files at once (decoding releases the GIL); the
        # results are reported in config order, so the report does not depend on which thread ran first
        names = list(signatures)
        with ThreadPoolExecutor(max_workers=VERIFY_WORKERS, thread_name_prefix="qk-verify") as pool:
            for name, res in zip(names, pool.map(lambda n: self._check_rows(n, configs[n], specs), names)):
                self.report.checked["rows"] += res.rows
                self.report.checked["sampled_rows"] += res.sampled_rows
                if res.problem is not None:
                    self.problem(configs[name], res.problem)
                else:
                    self._report_rows(name, configs[name], res.stats, specs)
        meta = self._split_meta(split)
        if isinstance(meta, dict) and isinstance(meta.get("rows_total"), int) and len(num_rows) == len(configs):
            disk = sum(num_rows.values())
            if meta["rows_total"] != disk:
                self.warn(self.final / "README.md", f"records {meta['rows_total']:,} rows for split {split!r} but its "
                                                    f"files hold {disk:,}: render the README again")

    def _check_schema(self, path: Path, schema: pa.Schema) -> tuple[int, str, bool] | None:
        """Compare with ``row_schema``; return (head_dim, vector dtype, token_str) when it matches."""
        vec = schema.field("vector").type if "vector" in schema.names else None
        if not isinstance(vec, pa.FixedSizeListType) or vec.value_type not in (pa.float32(), pa.float16()):
            head_dim, dtype = 0, "float32"
        else:
            head_dim, dtype = vec.list_size, "float16" if vec.value_type == pa.float16() else "float32"
        token = "token_str" in schema.names
        expected = row_schema(max(head_dim, 1), dtype, token)
        if schema.equals(expected):
            return head_dim, dtype, token
        issues = []
        missing = [n for n in expected.names if n not in schema.names]
        extra = [n for n in schema.names if n not in expected.names]
        if missing:
            issues.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            issues.append(f"unexpected column(s) {', '.join(extra)}")
        if not missing and not extra and schema.names != expected.names:
            issues.append(f"columns in the order {', '.join(schema.names)} instead of {', '.join(expected.names)}")
        for f in expected:
            if f.name not in schema.names:
                continue
            got = schema.field(f.name)
            if f.name == "vector":
                if head_dim == 0:
                    issues.append(f"vector is {got.type}, expected a fixed-size list of float32 or float16")
                elif got.nullable != f.nullable:
                    issues.append("vector is nullable, expected not null")
                continue
            if not got.type.equals(f.type):
                issues.append(f"{f.name} is {got.type}, expected {f.type}")
            elif got.nullable != f.nullable:
                issues.append(f"{f.name} is {'nullable' if got.nullable else 'not null'}, expected "
                              f"{'nullable' if f.nullable else 'not null'}")
        if not issues:  # only a nested field differs (the vector's items)
            issues.append(f"vector is {schema.field('vector').type}, expected {expected.field('vector').type}")
        self.problem(path, f"schema differs from the dataset schema: {'; '.join(issues)}; "
                           f"{REBUILD}")
        return None

    def _check_rows(self, name: str, path: Path, specs: list[SamplerSpec] | None) -> _FileRows:
        """Stream one file's rows; runs in a worker thread and changes nothing shared."""
        # page CRCs are verified where the writer stored them; without them zstd decodes damaged bytes silently
        try:
            pf = pq.ParquetFile(path, page_checksum_verification=True, **STREAM)
        except Exception as exc:  # noqa: BLE001 - read a moment ago; changed since
            return _FileRows(problem=f"is not readable Parquet ({type(exc).__name__}: {exc}); {REBUILD}")
        with pf:
            return self._stream_rows(name, path, pf, specs)

    def _stream_rows(self, name: str, path: Path, pf: pq.ParquetFile, specs: list[SamplerSpec] | None) -> _FileRows:
        layer_s, head_s, kind = CONFIG_RE.match(name).groups()
        layer, head = int(layer_s), int(head_s)
        n = pf.metadata.num_rows
        out = _FileRows(rows=n)
        # the rows whose sampling decision is recomputed: a seeded random subset, the same on every run
        if self.sample_rows is None or n <= self.sample_rows:
            sample = np.arange(n, dtype=np.int64)
        else:
            rng = np.random.default_rng(zlib.crc32(self.rel(path).encode()))
            sample = np.sort(rng.choice(n, size=self.sample_rows, replace=False)).astype(np.int64)
        st = _RowStats()
        prev: tuple[int, int] | None = None
        start = 0
        columns = [c for c in pf.schema_arrow.names if c != "token_str"]
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                m = batch.num_rows
                ex = batch.column("example_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                pos = batch.column("position").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                prev = st.keys(ex, pos, prev)
                st.constant("layer", batch.column("layer"), pa.scalar(layer, pa.int16()))
                st.constant("head", batch.column("head"), pa.scalar(head, pa.int16()))
                st.constant("kind", batch.column("kind"), pa.scalar(kind, pa.string()))
                st.window(batch.column("sliding_window"))
                if m and int(pos.min()) < 0:
                    st.negative += int((pos < 0).sum())
                vec = batch.column("vector")
                st.null_vectors += vec.null_count
                st.null_values += vec.flatten().null_count
                if specs is not None and m:
                    bucket = batch.column("bucket").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
                    good = np.zeros(m, dtype=bool)
                    expected_first = None
                    for spec in specs:
                        want = bucket_of(np.maximum(pos, 0), spec.type, spec.min_bucket_size)
                        good |= want == bucket
                        expected_first = want if expected_first is None else expected_first
                    bad = np.nonzero(~good)[0]
                    if len(bad):
                        st.bad_bucket += len(bad)
                        if st.bad_bucket_example is None:
                            i = bad[0]
                            st.bad_bucket_example = (int(ex[i]), int(pos[i]), int(bucket[i]), int(expected_first[i]))
                    lo, hi = np.searchsorted(sample, [start, start + m])
                    local = sample[lo:hi] - start
                    if len(local):
                        out.sampled_rows += len(local)
                        sel = np.zeros(len(local), dtype=bool)
                        sp, se = np.maximum(pos[local], 0), ex[local]
                        for spec in specs:
                            p = keep_probability(bucket_of(sp, spec.type, spec.min_bucket_size), spec.type,
                                                 spec.base_rate, spec.min_bucket_size)
                            sel |= sampler_u(spec, se, layer, head, kind, sp) < p
                        miss = np.nonzero(~sel)[0]
                        st.sampled += len(local)
                        st.unselected += len(miss)
                        room = max(0, NAMED - len(st.unselected_examples))
                        st.unselected_examples += [(int(se[i]), int(sp[i])) for i in miss[:room]]
                start += m
        except Exception as exc:  # noqa: BLE001 - a page that does not decode is a damaged file
            out.problem = f"cannot be decoded after {start:,} of {n:,} rows ({type(exc).__name__}: {exc}); {REBUILD}"
            return out
        out.stats = st
        return out

    def _report_rows(self, name: str, path: Path, st: _RowStats, specs: list[SamplerSpec] | None) -> None:
        layer_s, head_s, kind = CONFIG_RE.match(name).groups()
        if st.duplicates or st.decreasing:
            dup = st.duplicates
            if st.decreasing:
                try:
                    uniq = pl.scan_parquet(path).select(pl.struct(KEYS).n_unique()).collect().item()
                    dup = pl.scan_parquet(path).select(pl.len()).collect().item() - uniq
                except Exception:  # noqa: BLE001 - the streaming pass already read it; keep its count
                    pass
                a, b = st.decreasing_example
                self.problem(path, f"rows are not sorted by (example_id, position): {st.decreasing:,} key(s) "
                                   f"smaller than the one before, first {b} after {a}; final files are sorted by "
                                   f"merge: {REBUILD}")
            if dup:
                ex = f", e.g. {st.duplicate_example}" if st.duplicate_example else ""
                self.problem(path, f"{dup:,} duplicate (example_id, position) key(s){ex}; keys are unique in a "
                                   f"final file: {REBUILD}")
        for col, want in (("layer", int(layer_s)), ("head", int(head_s)), ("kind", kind)):
            bad, value = st.mismatch.get(col, (0, None))
            if bad:
                self.problem(path, f"column {col} holds {value!r} in {bad:,} row(s) but the path says {want!r} "
                                   f"({name}): rows of another config were written here; {REBUILD}")
        if st.negative:
            self.problem(path, f"{st.negative:,} row(s) have a negative position; {REBUILD}")
        if st.null_vectors or st.null_values:
            self.problem(path, f"{st.null_vectors:,} null vector(s) and {st.null_values:,} null value(s) inside "
                               f"vectors; {REBUILD}")
        if len(st.windows) > 1:
            self.problem(path, f"sliding_window is not constant ({_named(sorted(st.windows, key=str))}); one file "
                               f"holds one layer: {REBUILD}")
        if specs is None:
            return
        desc = " or ".join(f"({_describe_spec(s)})" for s in specs)
        if st.bad_bucket:
            e, p, got, want = st.bad_bucket_example
            self.problem(path, f"{st.bad_bucket:,} row(s) have a bucket that the recorded sampler {desc} does not "
                               f"give their position, e.g. example_id {e} position {p}: bucket {got}, expected "
                               f"{want}; the file was edited or captured with other settings: {REBUILD}")
        if st.unselected:
            self.problem(path, f"{st.unselected:,} of {st.sampled:,} checked row(s) would not be selected by the "
                               f"recorded sampler {desc}, e.g. (example_id, position) "
                               f"{_named(st.unselected_examples)}: they come from a capture with other sampling "
                               f"settings or the file is corrupt; {REBUILD} (rows appended on purpose with other "
                               f"settings are recorded by merge with output.allow_mixed_sampling, then render-readme)")

    # -- README --------------------------------------------------------------------------------
    def _check_readme(self, layout: dict[str, dict[str, Path]]) -> None:
        readme = self.final / "README.md"
        fix = "render it again (sniff-qk render-readme --config ...)"
        if not readme.is_file():
            if layout:
                self.problem(readme, f"is missing, so load_dataset finds no configs; {fix}")
            return
        if self.front is None:
            return  # reported when it was read
        configs = self.front.get("configs")
        if configs is None:
            if layout:
                self.problem(readme, f"front matter has no configs: list; {fix}")
            return
        if not isinstance(configs, list):
            self.problem(readme, f"configs: is a {type(configs).__name__}, not a list; {fix}")
            return
        parts = {s: {c: CONFIG_RE.match(c).groups() for c in cfgs} for s, cfgs in layout.items()}
        rel_files = {s: {c: self.rel(p)[len("final/"):] for c, p in cfgs.items()} for s, cfgs in layout.items()}

        def members(name: str) -> dict[str, set[str]] | None:
            """Split -> data files an entry must match exactly (None: not a name this project writes)."""
            if CONFIG_RE.match(name):
                return {s: {f[name]} for s, f in rel_files.items() if name in f}
            for rx, pred in _AGGREGATES:
                m = rx.fullmatch(name)
                if m:
                    out = {s: {rel_files[s][c] for c, p in ps.items() if pred(m, p)} for s, ps in parts.items()}
                    return {s: v for s, v in out.items() if v}
            return None

        required = {c for cfgs in layout.values() for c in cfgs}
        for ps in parts.values():
            for layer, head, kind in ps.values():
                required |= {"all", f"all_{kind}", f"layer{layer}", f"layer{layer}_{kind}", f"l{layer}h{head}"}
        # a split no entry mentions (or mentioned but absent from disk) is reported once, not once per config
        mentioned = {item.get("split") for e in configs if isinstance(e, dict) and isinstance(e.get("data_files"), list)
                     for item in e["data_files"] if isinstance(item, dict)}
        for split in sorted(set(layout) - mentioned):
            self.problem(readme, f"no config lists split {split!r}, which has {len(layout[split])} config file(s) "
                                 f"under final/data/{split}/; {fix}")
        for split in sorted(s for s in mentioned - set(layout) if isinstance(s, str)):
            self.problem(readme, f"lists split {split!r}, which has no files under final/data/{split}/; {fix}")
        skip = (set(layout) ^ mentioned)
        seen: set[str] = set()
        defaults = []
        glob_cache: dict[str, set[str]] = {}
        for i, entry in enumerate(configs):
            if not isinstance(entry, dict) or not isinstance(entry.get("config_name"), str):
                self.problem(readme, f"configs[{i}] has no config_name; {fix}")
                continue
            name = entry["config_name"]
            if name in seen:
                self.problem(readme, f"config {name!r} is listed more than once; {fix}")
                continue
            seen.add(name)
            if entry.get("default"):
                defaults.append(name)
            want = members(name)
            if want is None:
                self.warn(readme, f"config {name!r} is not a name qk-sniffer writes; its files were not checked")
                continue
            listed = self._entry_files(readme, name, entry.get("data_files"), glob_cache, fix)
            if listed is None:
                continue
            for split in sorted((set(listed) | set(want)) - skip):
                got, exp = listed.get(split), want.get(split, set())
                if got is None:
                    self.problem(readme, f"config {name!r} lists no data files for split {split!r}, which has "
                                         f"{_named(sorted(exp))}; {fix}")
                elif not exp and not got:
                    self.problem(readme, f"config {name!r} lists split {split!r} but its paths match no file "
                                         f"(the config has no data there); {fix}")
                elif not exp:
                    self.problem(readme, f"config {name!r} lists split {split!r}, which has no files of it, and "
                                         f"matches {_named(sorted(got))}; {fix}")
                elif got != exp:
                    extra, lacking = sorted(got - exp), sorted(exp - got)
                    what = []
                    if extra:
                        what.append(f"also match {_named(extra)}")
                    if lacking:
                        what.append(f"miss {_named(lacking)}")
                    self.problem(readme, f"config {name!r}, split {split!r}: its paths {' and '.join(what)}; {fix}")
        for name in sorted(required - seen, key=lambda n: (n != "all", n)):
            where = sorted(s for s, f in (members(name) or {}).items() if f and s not in skip)
            if not where:
                continue
            self.problem(readme, f"lists no config {name!r} although split(s) {', '.join(where)} have its files, so "
                                 f"load_dataset cannot load it by name; {fix}")
        if len(defaults) > 1:
            self.problem(readme, f"more than one config is marked default ({', '.join(defaults)}); datasets allows "
                                 f"one; {fix}")

    def _entry_files(self, readme: Path, name: str, data_files, cache: dict[str, set[str]],
                     fix: str) -> dict[str, set[str]] | None:
        """Split -> files the entry's globs match on disk, or None after reporting a malformed entry."""
        if not isinstance(data_files, list) or not data_files:
            self.problem(readme, f"config {name!r}: data_files must be a non-empty list of {{split, path}} items; "
                                 f"{fix}")
            return None
        out: dict[str, set[str]] = {}
        for item in data_files:
            if not isinstance(item, dict) or set(item) != {"split", "path"}:
                self.problem(readme, f"config {name!r}: data_files item {item!r} must have exactly the keys split "
                                     f"and path; {fix}")
                return None
            split, paths = item["split"], item["path"]
            if not isinstance(split, str) or not SPLIT_RE.fullmatch(split):
                self.problem(readme, f"config {name!r}: split {split!r} is not a valid split name; {fix}")
                return None
            if split in out:
                self.problem(readme, f"config {name!r} lists split {split!r} twice; {fix}")
                return None
            paths = [paths] if isinstance(paths, str) else paths
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
                self.problem(readme, f"config {name!r}, split {split!r}: path must be a glob or a list of globs; "
                                     f"{fix}")
                return None
            matched: set[str] = set()
            for pattern in paths:
                pp = PurePosixPath(pattern)
                if pp.is_absolute() or ".." in pp.parts or "://" in pattern:
                    self.problem(readme, f"config {name!r}, split {split!r}: path {pattern!r} must be relative to "
                                         f"the dataset folder; {fix}")
                    return None
                if pattern not in cache:
                    cache[pattern] = {
                        r for p in self.final.glob(pattern) if p.is_file()
                        and not _hidden(r := p.relative_to(self.final).as_posix())
                    }
                matched |= cache[pattern]
            out[split] = matched
        return out

    # -- staging -------------------------------------------------------------------------------
    def _check_staging(self) -> None:
        base = staging_dir(self.root)
        if not base.is_dir():
            return
        fingerprint = matches = None
        if self.cfg is not None:
            from .chunk_plan import manifest_fingerprint_matches
            from .config import chunk_fingerprint

            fingerprint = chunk_fingerprint(self.cfg)
            matches = manifest_fingerprint_matches
        chunks = sorted((d for d in base.iterdir() if d.is_dir() and CHUNK_DIR_RE.fullmatch(d.name)),
                        key=lambda d: int(d.name.split("-")[1]))
        for d in chunks:
            mf = d / "manifest.json"
            if not mf.is_file():
                self.warn(d, "has no manifest.json: an unfinished or crashed chunk, which merge ignores; rerun it "
                             f"(snakemake {self.rel(mf)}) or delete it")
                continue
            manifest, err = _read_json(mf)
            if manifest is None:
                self.problem(mf, f"is not readable JSON ({err}); delete {self.rel(d)} and rerun that chunk")
                continue
            self.report.checked["chunks"] += 1
            rows, files = manifest.get("rows"), manifest.get("files")
            summaries = manifest.get("summaries") if isinstance(manifest.get("summaries"), dict) else {}
            if not isinstance(rows, dict) or not isinstance(files, dict):
                self.problem(mf, f"has no rows/files mappings; delete {self.rel(d)} and rerun that chunk")
                continue
            if matches is not None and not matches(manifest, self.cfg):
                self.warn(mf, f"was produced by another config (fingerprint {manifest.get('config_fingerprint')}, "
                              f"the given config has {fingerprint}): merge with this config refuses it")
            for name in sorted(set(files) - {k for k, v in rows.items() if isinstance(v, int) and v > 0}):
                self.problem(mf, f"lists a file for {name!r} but no rows for it; delete {self.rel(d)} and rerun "
                                 "that chunk")
            for name, count in sorted(rows.items()):
                if not isinstance(count, int) or count <= 0:
                    if not isinstance(count, int) or count < 0:
                        self.problem(mf, f"records {count!r} rows for {name!r}; delete {self.rel(d)} and rerun "
                                         "that chunk")
                    continue
                rel = files.get(name)
                if not isinstance(rel, str):
                    self.problem(mf, f"records {count} rows for {name!r} but lists no file; delete {self.rel(d)} "
                                     "and rerun that chunk")
                    continue
                p = d / rel
                if not p.is_file():
                    self.problem(p, f"is missing although {self.rel(mf)} records {count} rows in it; delete "
                                    f"{self.rel(d)} and rerun that chunk")
                    continue
                self.report.checked["staged_files"] += 1
                try:
                    footer = read_footer(p)
                    got = footer.num_rows
                except Exception as exc:  # noqa: BLE001
                    self.problem(p, f"is not readable Parquet ({type(exc).__name__}: {exc}); delete {self.rel(d)} "
                                    "and rerun that chunk")
                    continue
                if got != count:
                    self.problem(p, f"holds {got:,} rows but {self.rel(mf)} records {count:,}; delete "
                                    f"{self.rel(d)} and rerun that chunk")
                summary = summaries.get(name)
                if summary is not None and not matches_summary(footer, summary):
                    self.problem(p, f"is not the file its chunk wrote (its size or footer differ from the record in "
                                    f"{self.rel(mf)}; merge would read it instead of trusting the record); delete "
                                    f"{self.rel(d)} and rerun that chunk")
                elif isinstance(summary, dict):  # the record a merge trusts instead of reading the file
                    wrong = [what for what, right in (
                        ("row count", summary.get("rows") == got),
                        ("row groups' offsets", summary.get("row_group_offsets") in (None, offset_map(footer))),
                    ) if not right]
                    if wrong:
                        self.problem(p, f"{self.rel(mf)} records its {' and '.join(wrong)} wrongly (a merge trusting "
                                        f"that record would write a wrong file); delete {self.rel(d)} and rerun "
                                        "that chunk")


def _sig(sig: tuple[int, str, bool]) -> str:
    d, dtype, token = sig
    return f"vector {dtype}[{d}] {'with' if token else 'without'} token_str"



@dataclass
class _FileRows:
    """What streaming one file's rows found."""

    rows: int = 0
    sampled_rows: int = 0
    problem: str | None = None
    stats: _RowStats | None = None


class _RowStats:
    """Counters a streaming pass over one file accumulates (vectorised per record batch)."""

    def __init__(self) -> None:
        self.duplicates = 0
        self.duplicate_example: tuple[int, int] | None = None
        self.decreasing = 0
        self.decreasing_example: tuple[tuple[int, int], tuple[int, int]] | None = None
        self.mismatch: dict[str, tuple[int, object]] = {}
        self.windows: set = set()
        self.negative = 0
        self.null_vectors = 0
        self.null_values = 0
        self.bad_bucket = 0
        self.bad_bucket_example: tuple[int, int, int, int] | None = None
        self.sampled = 0
        self.unselected = 0
        self.unselected_examples: list[tuple[int, int]] = []

    def keys(self, ex: np.ndarray, pos: np.ndarray, prev: tuple[int, int] | None) -> tuple[int, int] | None:
        """Count equal and decreasing neighbour keys (the previous batch's last key included)."""
        if not len(ex):
            return prev
        if prev is not None:
            ex = np.concatenate([[prev[0]], ex])
            pos = np.concatenate([[prev[1]], pos])
        dex, dpos = np.diff(ex), np.diff(pos)
        same = dex == 0
        dup = np.nonzero(same & (dpos == 0))[0]
        dec = np.nonzero((dex < 0) | (same & (dpos < 0)))[0]
        if len(dup):
            self.duplicates += len(dup)
            if self.duplicate_example is None:
                self.duplicate_example = (int(ex[dup[0] + 1]), int(pos[dup[0] + 1]))
        if len(dec):
            self.decreasing += len(dec)
            if self.decreasing_example is None:
                i = dec[0]
                self.decreasing_example = ((int(ex[i]), int(pos[i])), (int(ex[i + 1]), int(pos[i + 1])))
        return int(ex[-1]), int(pos[-1])

    def constant(self, col: str, values: pa.Array, want: pa.Scalar) -> None:
        eq = pc.equal(values, want)
        bad = len(values) - int(pc.sum(eq).as_py() or 0)  # nulls count as mismatches
        if bad:
            n, first = self.mismatch.get(col, (0, None))
            if first is None:
                wrong = values.filter(pc.invert(pc.fill_null(eq, False)))
                first = wrong[0].as_py() if len(wrong) else None
            self.mismatch[col] = (n + bad, first)

    def window(self, values: pa.Array) -> None:
        if len(self.windows) > NAMED:
            return
        self.windows |= set(pc.unique(values).to_pylist())


def verify(root: Path, *, cfg: dict | None = None, sample_rows: int | None = SAMPLE_ROWS) -> VerifyReport:
    """Check the data root ``root`` (its ``final/`` dataset, card and ``staging/`` chunks); change nothing.

    ``cfg`` (a validated config) is optional: it supplies the sampler of its own split when neither the
    README nor ``.merged.json`` records one, and flags staged chunks another config produced.
    ``sample_rows`` bounds the rows per file whose sampling decision is recomputed (None: all rows).
    """
    return _Verifier(Path(root), cfg, sample_rows).run()


def verify_staging(root: Path, *, cfg: dict | None = None) -> VerifyReport:
    """Check only the staged chunks under ``root/staging`` against their manifests (a sweep member's own staging,
    whose ``final/`` is its dataset root's and is checked once there)."""
    checker = _Verifier(Path(root), cfg, SAMPLE_ROWS)
    checker._check_staging()
    return checker.report
