"""Installing a converted dataset into a data root: the destination's checks, the journal (``migrate.json``),
the card's record of the migrated splits' sampling, the files renamed into ``final/``; :func:`migrate` and the
command ``sniff-qk migrate``."""

from __future__ import annotations

import filecmp
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .. import legacy
from ..config import data_root, load_config, split_name
from ..front_matter import ReadmeError, read_front_matter
from ..layout import atomic_write_json, atomic_write_text, data_file, final_dir
from ..parquet import write_parquet_atomic
from ..records import utc_now
from ..store import card_splits, merged_record
from .convert import convert_config
from .errors import NOTHING, MigrateError
from .source import plan_source

log = logging.getLogger("qk_sniffer")

JOURNAL = "migrate.json"
WORK_PREFIX = ".migrate-"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    for split in sorted(plan["splits"]):
        base = final / "data" / split
        there = (base.is_dir() and any(base.iterdir())) or merged_record(final, split) is not None or split in metas
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
        from ..remote.configured import remote_for

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
    metas = card_splits(fm)
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
              "targets": sorted(p.relative_to(final).as_posix() for p in targets), "at": at or utc_now(),
              "summary": summary}
    atomic_write_json(root / JOURNAL, {**record, "state": "moving"})
    _record_in_card(final, fm, body, plan, stats, record, legacy.original_metadata(base))
    changed = _install(work, final, replace=recovering)
    from ..card import render_readme

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
