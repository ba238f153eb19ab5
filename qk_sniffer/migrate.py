"""``sniff-qk migrate``: convert a dataset of the original qk-sniffer tool into this project's layout and schema.

Source: a folder holding it (a download of its repo or branch), else the config's remote (downloaded into the
data root first), in either layout of :mod:`qk_sniffer.legacy` (README layout: every split keeps its name; branch
layout: one model, which becomes the config's split). Result: ``final/data/<split>/<config>/data.parquet`` of the
data root in the dataset schema (layer/head/kind from the path, fixed-size vectors), sorted by and unique on
``(example_id, position)`` (of rows sharing a key the first is kept; those with another vector are counted),
written by ``parquet.write_parquet_atomic``; and the card, recording each migrated split's sampling as the original
tool's (``legacy.ORIGINAL_SAMPLING``): merging captures into it needs ``output.allow_mixed_sampling``, and
``verify`` skips its sampler checks.

Every source file is read, checked and converted into a temporary folder of the data root before ``final/``
changes: bad input changes nothing. Then ``<data_root>/migrate.json`` says ``moving``, the card records the sampling,
the files are renamed into ``final/``, the card is rendered, ``migrate.json`` says ``done``. A rerun changes nothing
or completes a killed run. A split in ``final/`` that is not this migration's is refused (never merged into).
"""

from __future__ import annotations

import datetime as _dt
import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from . import legacy
from .config import data_root, load_config, split_name
from .errors import QkSnifferError
from .front_matter import ReadmeError, read_front_matter
from .layout import atomic_write_json, atomic_write_text, data_file, final_dir, parse_config_name
from .parquet import read_footer, write_parquet_atomic
from .writer import row_schema

log = logging.getLogger("qk_sniffer")

JOURNAL = "migrate.json"
WORK_PREFIX = ".migrate-"
NOTHING = "nothing was migrated"
SPLIT_RE = re.compile(r"\w+(\.\w+)*")


class MigrateError(QkSnifferError, ValueError):
    """The source cannot be migrated (or not into this data root); one line, and nothing was changed."""


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# -- the source ---------------------------------------------------------------------------------


def plan_source(base: Path, where: str, split: str) -> dict:
    """What ``base`` holds, checked from the footers: ``{"layout", "splits": {split: {config: [files]}},
    "token": {split: bool}, "rows": {file: n}, "digest"}``; raises :class:`MigrateError` for anything else."""
    base = Path(base)
    if not base.is_dir():
        raise MigrateError(f"{where} is not a directory: give the folder holding the original tool's dataset (a "
                           f"download of its repo or branch), or no SOURCE to read the config's remote; {NOTHING}")
    top = legacy.top_configs(base)
    nested = list(legacy.nested_configs(base))
    if top and nested:
        raise MigrateError(f"{where} holds both of the original tool's layouts ({top[0][0]}/ at the top and "
                           f"data/{nested[0][0]}/{nested[0][1]}/); give the folder of one of them; {NOTHING}")
    if not top and not nested:
        raise MigrateError(f"{where} holds no dataset of the original qk-sniffer tool (no data/<split>/lLLhHH{{q|k}}/"
                           f"data.parquet and no lLLhHH{{q|k}}/data.parquet at the top); {NOTHING}")
    splits: dict[str, dict[str, list[Path]]] = {}
    if top:
        splits[split] = dict(top)
    for s, name, files in nested:
        splits.setdefault(s, {})[name] = files
    for s in (s for s in splits if not SPLIT_RE.fullmatch(s)):
        raise MigrateError(f"{where}: split {s!r} is not a valid split name (letters, digits, _ and inner dots); "
                           f"rename data/{s} in a copy of the source and migrate that; {NOTHING}")
    token: dict[str, bool] = {}
    rows: dict[Path, int] = {}
    ident = []
    for s, configs in sorted(splits.items()):
        for name, files in sorted(configs.items()):
            for p in files:
                try:
                    footer = read_footer(p)
                    names = footer.md.schema.to_arrow_schema().names
                except Exception as exc:  # noqa: BLE001 - any failure to read the footer: not usable Parquet
                    raise MigrateError(f"{p} is not readable Parquet ({type(exc).__name__}: {exc}); {NOTHING}") from exc
                if set(legacy.OWN_COLUMNS) <= set(names):
                    raise MigrateError(f"{p} already has this project's layer/head/kind columns: {where} is not a "
                                       f"dataset of the original tool (pull or copy it instead); {NOTHING}")
                missing = [c for c in legacy.ROW_COLUMNS if c not in names]
                if missing:
                    raise MigrateError(f"{p} lacks the column(s) {', '.join(missing)} of the original tool's files "
                                       f"(bucket, example_id, position, vector, sliding_window); {NOTHING}")
                token[s] = token.get(s, False) or "token_str" in names
                rows[p] = footer.md.num_rows
                ident.append([s, name, p.relative_to(base).as_posix(), footer.size, footer.digest])
    layout = "branch" if top else "readme"
    digest = hashlib.sha256(json.dumps([layout, ident]).encode()).hexdigest()[:32]
    return {"layout": layout, "splits": splits, "token": token, "rows": rows, "digest": digest}


# -- converting one config ------------------------------------------------------------------------


def _cast(col, typ, path: Path, name: str, nulls: bool = False) -> pa.Array:
    if col.null_count and not nulls:
        raise MigrateError(f"{path}: column {name} holds {col.null_count:,} null value(s); {NOTHING}")
    try:
        out = pc.cast(col, typ)  # safe: a value that does not fit raises
        return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise MigrateError(f"{path}: column {name} ({col.type}) does not fit {typ} ({exc}); {NOTHING}") from exc


def _vectors(col, path: Path) -> pa.FixedSizeListArray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if col.null_count:
        raise MigrateError(f"{path}: {col.null_count:,} null vector(s); {NOTHING}")
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if len(lengths) != 1:
            raise MigrateError(f"{path}: vectors of different lengths ({', '.join(map(str, lengths[:4]))}); {NOTHING}")
        d = int(lengths[0])
    else:
        raise MigrateError(f"{path}: column vector is {t}, not a list of float32; {NOTHING}")
    values = col.flatten()
    if values.type not in (pa.float32(), pa.float16()) or d < 1:
        raise MigrateError(f"{path}: vectors of {values.type}[{d}], expected float32 (or float16); {NOTHING}")
    if values.null_count:
        raise MigrateError(f"{path}: {values.null_count:,} null value(s) inside vectors; {NOTHING}")
    return pa.FixedSizeListArray.from_arrays(values, d)


def _read_file(path: Path) -> dict:
    try:
        t = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        raise MigrateError(f"{path} is not readable Parquet ({type(exc).__name__}: {exc}); {NOTHING}") from exc
    n, names = t.num_rows, t.column_names
    out = {c: _cast(t.column(c), typ, path, c) for c, typ in
           (("bucket", pa.int32()), ("example_id", pa.int64()), ("position", pa.int32()))}
    if n and pc.min(out["position"]).as_py() < 0:
        raise MigrateError(f"{path}: negative positions; {NOTHING}")
    window = t.column("sliding_window") if "sliding_window" in names else pa.nulls(n, pa.int32())
    out["sliding_window"] = _cast(window, pa.int32(), path, "sliding_window", nulls=True)
    out["token_str"] = _cast(t.column("token_str"), pa.string(), path, "token_str", True) if "token_str" in names else None
    return {**out, "vector": _vectors(t.column("vector"), path), "rows": n}


def convert_config(files: list[Path], name: str, token: bool) -> tuple[pa.Table, dict]:
    """The rows of one config's source files in the dataset schema, sorted and unique on the key; and counts."""
    layer, head, kind = parse_config_name(name)
    parts = [p for p in (_read_file(f) for f in files) if p["rows"]]
    types = {(p["vector"].type.list_size, str(p["vector"].type.value_type)) for p in parts}
    if len(types) > 1:
        raise MigrateError(f"{files[0].parent}: its files hold vectors of different sizes or types ({sorted(types)}); "
                           f"{NOTHING}")
    d, dtype = types.pop()
    n = sum(p["rows"] for p in parts)
    cols = {c: pa.chunked_array([p[c] for p in parts]).combine_chunks()
            for c in ("bucket", "example_id", "position", "vector", "sliding_window")}
    if pc.count_distinct(cols["sliding_window"], mode="all").as_py() > 1:
        raise MigrateError(f"{files[0].parent}: sliding_window is not constant within the config; {NOTHING}")
    if token:
        cols["token_str"] = pa.chunked_array(
            [p["token_str"] if p["token_str"] is not None else pa.nulls(p["rows"], pa.string()) for p in parts],
            type=pa.string()).combine_chunks()
    ex, pos = cols["example_id"].to_numpy(), cols["position"].to_numpy()
    order = np.lexsort((pos, ex))  # stable: of rows sharing a key, the first in the files comes first
    ex, pos = ex[order], pos[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (ex[1:] != ex[:-1]) | (pos[1:] != pos[:-1])
    conflicts = 0
    if not first.all():
        flat = cols["vector"].flatten().to_numpy(zero_copy_only=False)
        vec = flat.view(np.uint16 if dtype == "halffloat" else np.uint32).reshape(n, d)[order]  # bitwise compare
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        dup = np.nonzero(~first)[0]
        conflicts = int((vec[dup] != vec[start[dup]]).any(axis=1).sum())
    keep = pa.array(order[first])
    schema = row_schema(d, "float16" if dtype == "halffloat" else "float32", token)
    m = len(keep)
    arrays = [cols[f.name].take(keep) for f in schema if f.name in cols]
    arrays += [pa.array(np.full(m, layer, np.int16)), pa.array(np.full(m, head, np.int16)), pa.array([kind] * m, pa.string())]
    table = pa.Table.from_arrays(arrays, schema=schema)
    buckets = dict(zip(*(v.tolist() for v in np.unique(table["bucket"].to_numpy(), return_counts=True))))
    return table, {"rows": m, "duplicates_dropped": n - m, "conflicting_duplicates": conflicts, "buckets": buckets}


# -- the command ----------------------------------------------------------------------------------


def _front(final: Path) -> tuple[dict, str]:

    try:
        return read_front_matter(final / "README.md")
    except FileNotFoundError:
        return {}, ""
    except (ReadmeError, OSError, UnicodeDecodeError) as exc:
        raise MigrateError(f"{final / 'README.md'} cannot be read ({exc}); fix or remove it; {NOTHING}") from exc


def _ours(split: str, digest: str, metas: dict, journal: dict) -> bool:
    rec = (metas.get(split) or {}).get("migrated") or {}
    return rec.get("source_digest") == digest or (journal.get("source_digest") == digest
                                                  and split in (journal.get("splits") or []))


def _check_destination(final: Path, plan: dict, metas: dict, journal: dict) -> None:
    merged = _json(final / ".merged.json")
    for split in sorted(plan["splits"]):
        base = final / "data" / split
        there = (base.is_dir() and any(base.iterdir())) or merged.get("split") == split or split in metas
        if there and not _ours(split, plan["digest"], metas, journal):
            other = " or another split (output.split_name)" if plan["layout"] == "branch" else ""
            raise MigrateError(f"split {split!r} already exists in {final} and is not the result of migrating this "
                               f"source; migrate into another data root (output.data_root){other}: a migrated split is "
                               f"never merged into another; {NOTHING}")


def _install(work: Path, final: Path, replace: bool) -> int:
    """Move the converted files into ``final/``: a file with equal bytes there stays as it is, one that differs is
    replaced only when ``replace`` (completing a migration that was killed). Returns the files changed."""
    changed = 0
    for src in sorted(work.rglob("*.parquet")):
        dst = final / src.relative_to(work)
        if dst.is_file():
            if filecmp.cmp(src, dst, shallow=False):
                continue
            if not replace:
                log.warning("%s differs from its migration (rows appended since?): kept as it is", dst)
                continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        changed += 1
    return changed


def migrate(cfg: dict, source: Path | None = None, root: Path | None = None) -> dict:
    """Convert the original tool's dataset at ``source`` (default: the config's remote) into the data root's
    ``final/``; returns what was done (``changed`` is False when it already held this migration)."""
    root = Path(root) if root is not None else data_root(cfg)
    final = final_dir(root)
    split = split_name(cfg)
    legacy.refuse_local(root)  # the destination must be a data root of this project's format
    local = None
    if source is not None:  # checked before the data root is touched
        local = (Path(source).absolute(), str(source))
        local += (plan_source(local[0], local[1], split),)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(WORK_PREFIX + "*"):  # left by a killed migration (the pid in the name is gone)
        pid = stale.name[len(WORK_PREFIX):].split("-")[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-", dir=root))
    try:
        return _migrate(cfg, local, root, final, split, _json(root / JOURNAL), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            try:
                root.rmdir()  # only when nothing was migrated into it
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        pass
    return True


def _migrate(cfg, local, root: Path, final: Path, split: str, journal: dict, tmp: Path) -> dict:
    if local is None:
        from .remote.configured import remote_for

        remote = remote_for(cfg)
        if remote is None:
            raise MigrateError("migrate: give SOURCE (the folder holding the original tool's dataset) or a config with "
                               f"output.hf_repo_id or output.remote_dir to read it from; {NOTHING}")
        rev = remote.head()
        if rev is None:
            raise MigrateError(f"{remote.describe()} does not exist (or holds nothing); {NOTHING}")
        where = f"{remote.describe()} revision {rev}"
        if journal.get("source") == where and journal.get("state") == "done" \
                and all((final / rel).is_file() for rel in journal.get("targets") or []):
            return {"changed": False, "source": where, "root": str(root), **journal.get("summary", {})}
        base = tmp / "source"
        remote.download(base, rev)
        plan = plan_source(base, where, split)
    else:
        base, where, plan = local
    fm, body = _front(final)
    metas = ((fm.get("qk_sniffer") or {}).get("splits") or {}) if isinstance(fm.get("qk_sniffer"), dict) else {}
    _check_destination(final, plan, metas, journal)
    targets = {data_file(final, s, name) for s, configs in plan["splits"].items() for name, files in configs.items()
               if sum(plan["rows"][f] for f in files)}
    recovering = journal.get("source_digest") == plan["digest"] and journal.get("state") == "moving"
    if not recovering and all(_ours(s, plan["digest"], metas, journal) for s in plan["splits"]) \
            and all(p.is_file() for p in targets):
        return {"changed": False, "source": where, "root": str(root), **journal.get("summary", {})}

    # convert everything into the work folder: bad input stops here, before anything in final/ changes
    work = tmp / "final"
    stats: dict[str, dict] = {}
    for s, configs in sorted(plan["splits"].items()):
        st = stats[s] = {"configs": 0, "rows": 0, "duplicates_dropped": 0, "conflicting_duplicates": 0,
                         "empty_configs": 0, "files": sum(len(f) for f in configs.values()), "buckets": {}}
        for name, files in sorted(configs.items()):
            if not sum(plan["rows"][f] for f in files):
                st["empty_configs"] += 1
                continue
            table, counts = convert_config(files, name, plan["token"].get(s, False))
            write_parquet_atomic(table, data_file(work, s, name))
            st["configs"] += 1
            for b, c in counts.pop("buckets").items():
                st["buckets"].setdefault(b, {"q": 0, "k": 0})[name[-1]] += c
            for k, v in counts.items():
                st[k] += v
    summary = {"splits": dict(sorted(stats.items())), **{k: sum(v[k] for v in stats.values()) for k in
                                                        ("rows", "configs", "duplicates_dropped", "conflicting_duplicates")}}

    # journal, then the card's record of the splits' sampling (so a merge refuses to mix before any file lands),
    # then the files, then the card; the journal says done last
    at = journal.get("at") if journal.get("source_digest") == plan["digest"] else None
    record = {"source": where, "source_digest": plan["digest"], "layout": plan["layout"], "splits": sorted(stats),
              "targets": sorted(p.relative_to(final).as_posix() for p in targets), "at": at or _now(),
              "summary": summary}
    atomic_write_json(root / JOURNAL, {**record, "state": "moving"})
    _record_in_card(final, fm, body, plan, stats, record, legacy.original_metadata(base))
    changed = _install(work, final, replace=recovering)
    from .card import render_readme

    render_readme(cfg, root)
    atomic_write_json(root / JOURNAL, {**record, "state": "done"})
    log.info("migrated %d rows of %d configs from %s into %s (%d files changed)", summary["rows"], summary["configs"],
             where, final, changed)
    return {"changed": True, "source": where, "root": str(root), "files_changed": changed, **summary}


def _record_in_card(final: Path, fm: dict, body: str, plan: dict, stats: dict, record: dict, original: dict) -> None:
    """Record in the card, for each migrated split that lacks it, that its sampling is the original tool's (a split
    recorded already keeps its record: rows may have been appended to it since, with their own sampling)."""
    own = fm["qk_sniffer"] = fm["qk_sniffer"] if isinstance(fm.get("qk_sniffer"), dict) else {}
    splits = own["splits"] = own["splits"] if isinstance(own.get("splits"), dict) else {}
    todo = [s for s in stats if ((splits.get(s) or {}).get("migrated") or {}).get("source_digest") != plan["digest"]]
    if not todo:
        return
    for s in todo:
        meta = {**(original.get(s) or {}), **(splits.get(s) or {})}
        st = {k: v for k, v in stats[s].items() if k != "buckets"}
        meta.update(sampling=dict(legacy.ORIGINAL_SAMPLING), rows_total=st["rows"], updated_at=record["at"],
                    rows_per_bucket=[{"bucket": b, **n} for b, n in sorted(stats[s]["buckets"].items())])
        meta["migrated"] = {"from": record["source"], "layout": plan["layout"], "source_digest": plan["digest"],
                            "at": record["at"], **st}
        splits[s] = meta
    head = yaml.safe_dump(fm, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    atomic_write_text(final / "README.md", f"---\n{head}---\n{body}")


def cmd_migrate(config: str, source: str | None) -> int:
    """``sniff-qk migrate [SOURCE] --config CONFIG``: prints what was done; errors are one line (exit 1)."""
    cfg = load_config(config)
    res = migrate(cfg, Path(source) if source else None)
    final = final_dir(Path(res["root"]))
    if not res["changed"]:
        print(f"{final} already holds the migration of {res['source']}: nothing changed")
        return 0
    print(f"migrated {res['rows']:,} rows ({res['configs']} configs; split(s) {', '.join(res['splits'])}) from "
          f"{res['source']} into {final}; {res['duplicates_dropped']:,} duplicate key(s) dropped "
          f"({res['conflicting_duplicates']:,} with another vector)")
    print("its sampling is recorded as the original tool's: appending captures to these splits needs "
          "output.allow_mixed_sampling: true; publish to another branch or repo than the original's")
    return 0
