"""What a dataset of the original tool holds (either layout of :mod:`qk_sniffer.legacy`), checked from the
footers of its files before anything is read or written."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .. import legacy
from ..parquet import read_footer
from .errors import NOTHING, MigrateError

SPLIT_RE = re.compile(r"\w+(\.\w+)*")


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
