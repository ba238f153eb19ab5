"""The data-file check of one split: every ``final/data/<split>/<config>/data.parquet`` is readable Parquet with
exactly the dataset schema (``writer.row_schema``), and all files of the split agree on head dimension, vector
dtype and ``token_str``; then the rows of each file (:mod:`.rows`), a few files at a time (``VERIFY_WORKERS``,
memory holds one record batch per file); and the card's row count of the split against the footers.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..chunk.writer import row_schema
from .context import REBUILD, VerifyContext
from .rows import check_rows, report_rows
from .samplers import split_samplers

VERIFY_WORKERS = min(4, os.cpu_count() or 1)  # files streamed at once: memory holds this many record batches


def check_split(ctx: VerifyContext, split: str, configs: dict[str, Path]) -> None:
    """Check the files of ``split`` (config -> data file): footers and schemas first, then every file's rows."""
    specs, source = split_samplers(ctx, split)
    if specs is None:
        ctx.warn(f"final/data/{split}", f"bucket and sampling checks skipped: {source}")
    elif not specs:
        ctx.warn(f"final/data/{split}", "bucket and sampling checks skipped: the recorded sampler is unusable")
        specs = None
    # pass 1: footers only (one file open at a time: a large model has thousands of configs)
    signatures: dict[str, tuple[int, str, bool]] = {}
    num_rows: dict[str, int] = {}
    for name, path in configs.items():
        ctx.report.checked["files"] += 1
        try:
            with pq.ParquetFile(path) as pf:
                schema, num_rows[name] = pf.schema_arrow, pf.metadata.num_rows
        except Exception as exc:  # noqa: BLE001 - any failure to open means a damaged file
            ctx.problem(path, f"is not readable Parquet ({type(exc).__name__}: {exc}); {REBUILD}")
            continue
        sig = check_schema(ctx, path, schema)
        if sig is not None:
            signatures[name] = sig
    if signatures:
        counts = Counter(signatures.values())
        order = list(signatures.values())
        ref = max(counts, key=lambda s: (counts[s], -order.index(s)))  # the most common; ties: the first
        ref_file = next(configs[n] for n, s in signatures.items() if s == ref)
        for name, sig in signatures.items():
            if sig != ref:
                ctx.problem(configs[name], f"has {_sig(sig)} but the other files of split {split!r} have "
                                           f"{_sig(ref)} (e.g. {ctx.rel(ref_file)}); a split holds one model "
                                           f"captured with one setting: {REBUILD}, or write it to another split")
    # pass 2: the rows, streamed file by file, a few files at once (decoding releases the GIL); the
    # results are reported in config order, so the report does not depend on which thread ran first
    names = list(signatures)
    with ThreadPoolExecutor(max_workers=VERIFY_WORKERS, thread_name_prefix="qk-verify") as pool:
        for name, res in zip(names, pool.map(lambda n: check_rows(ctx, n, configs[n], specs), names)):
            ctx.report.checked["rows"] += res.rows
            ctx.report.checked["sampled_rows"] += res.sampled_rows
            if res.problem is not None:
                ctx.problem(configs[name], res.problem)
            else:
                report_rows(ctx, name, configs[name], res.stats, specs)
    meta = ctx.split_meta(split)
    if isinstance(meta, dict) and isinstance(meta.get("rows_total"), int) and len(num_rows) == len(configs):
        disk = sum(num_rows.values())
        if meta["rows_total"] != disk:
            ctx.warn(ctx.final / "README.md", f"records {meta['rows_total']:,} rows for split {split!r} but its "
                                                f"files hold {disk:,}: render the README again")

def check_schema(ctx: VerifyContext, path: Path, schema: pa.Schema) -> tuple[int, str, bool] | None:
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
    ctx.problem(path, f"schema differs from the dataset schema: {'; '.join(issues)}; "
                      f"{REBUILD}")
    return None


def _sig(sig: tuple[int, str, bool]) -> str:
    """A file's (head_dim, vector dtype, token_str) as a problem line names it."""
    d, dtype, token = sig
    return f"vector {dtype}[{d}] {'with' if token else 'without'} token_str"
