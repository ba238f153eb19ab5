"""The staging check: ``staging/chunk-*/manifest.json`` reads as a manifest, and every staged file it lists has
exactly the row count it records (from the Parquet footer). A chunk without a manifest is unfinished, not corrupt:
it is a warning. With a config, a chunk another config produced is a warning too (merge with this config refuses it).
"""

from __future__ import annotations

from ..chunk.plan import manifest_fingerprint_matches
from ..config import chunk_fingerprint
from ..layout import staging_dir
from ..parquet import read_footer
from ..records import RecordError, read_manifest
from ..store import CHUNK_DIR_RE
from .context import VerifyContext


def check_staged_chunks(ctx: VerifyContext) -> None:
    """Check every finished chunk under ``staging/`` against its manifest, in chunk order."""
    base = staging_dir(ctx.root)
    if not base.is_dir():
        return
    fingerprint = matches = None
    if ctx.cfg is not None:
        fingerprint = chunk_fingerprint(ctx.cfg)
        matches = manifest_fingerprint_matches
    chunks = sorted((d for d in base.iterdir() if d.is_dir() and CHUNK_DIR_RE.fullmatch(d.name)),
                    key=lambda d: int(d.name.split("-")[1]))
    for d in chunks:
        mf = d / "manifest.json"
        if not mf.is_file():
            ctx.warn(d, "has no manifest.json: an unfinished or crashed chunk, which merge ignores; rerun it "
                        f"(snakemake {ctx.rel(mf)}) or delete it")
            continue
        try:
            manifest = read_manifest(mf)
        except RecordError as exc:
            ctx.problem(mf, f"{exc.what}; delete {ctx.rel(d)} and rerun that chunk")
            continue
        ctx.report.checked["chunks"] += 1
        rows, files = manifest.rows, manifest.files
        if matches is not None and not matches(manifest, ctx.cfg):
            ctx.warn(mf, f"was produced by another config (fingerprint {manifest.config_fingerprint}, "
                         f"the given config has {fingerprint}): merge with this config refuses it")
        for name in sorted(set(files) - {k for k, v in rows.items() if v > 0}):
            ctx.problem(mf, f"lists a file for {name!r} but no rows for it; delete {ctx.rel(d)} and rerun "
                            "that chunk")
        for name, count in sorted(rows.items()):
            if count <= 0:
                if count < 0:
                    ctx.problem(mf, f"records {count!r} rows for {name!r}; delete {ctx.rel(d)} and rerun "
                                    "that chunk")
                continue
            rel = files.get(name)
            if rel is None:
                ctx.problem(mf, f"records {count} rows for {name!r} but lists no file; delete {ctx.rel(d)} "
                                "and rerun that chunk")
                continue
            p = d / rel
            if not p.is_file():
                ctx.problem(p, f"is missing although {ctx.rel(mf)} records {count} rows in it; delete "
                               f"{ctx.rel(d)} and rerun that chunk")
                continue
            ctx.report.checked["staged_files"] += 1
            try:
                got = read_footer(p).num_rows
            except Exception as exc:  # noqa: BLE001
                ctx.problem(p, f"is not readable Parquet ({type(exc).__name__}: {exc}); delete {ctx.rel(d)} "
                               "and rerun that chunk")
                continue
            if got != count:
                ctx.problem(p, f"holds {got:,} rows but {ctx.rel(mf)} records {count:,}; delete "
                               f"{ctx.rel(d)} and rerun that chunk")
