"""The card check: ``final/README.md``'s front matter has a ``configs:`` list that matches the files exactly,
aggregates included (``all``, ``all_q``, ``layerLL``, ``layerLL_k``, ``lLLhHH`` and every concrete config):
each entry's globs, expanded against the files on disk, must match exactly the files of its configs, split by
split, so that ``load_dataset`` loads each config by name.

The globs are expanded with :meth:`pathlib.Path.glob`, skipping the names ``datasets`` skips (dot-files,
``__``-prefixed). ``datasets.data_files.resolve_pattern`` (what ``load_dataset`` applies) gives the same files
for every pattern render-readme writes, but walks the whole split directory for each ``layerLL`` glob: about
twenty times slower on a card of 2,048 configs, and growing with layers times configs.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ..layout import CONFIG_RE
from .context import VerifyContext
from .data_layout import SPLIT_RE
from .report import named

# the aggregate configs render-readme writes, each with which (layer, head, kind) of a config it holds
_AGGREGATES = [
    (re.compile(r"all"), lambda m, p: True),
    (re.compile(r"all_([qk])"), lambda m, p: p[2] == m.group(1)),
    (re.compile(r"layer(\d{2,})"), lambda m, p: p[0] == m.group(1)),
    (re.compile(r"layer(\d{2,})_([qk])"), lambda m, p: p[0] == m.group(1) and p[2] == m.group(2)),
    (re.compile(r"l(\d{2,})h(\d{2,})"), lambda m, p: p[0] == m.group(1) and p[1] == m.group(2)),
]


def _hidden(rel: str) -> bool:
    """Names ``datasets`` skips when it resolves data files (dot-files, ``__``-prefixed)."""
    return any(part.startswith((".", "__")) for part in PurePosixPath(rel).parts)


def check_card(ctx: VerifyContext, layout: dict[str, dict[str, Path]]) -> None:
    """Check the card's ``configs:`` against ``layout`` (split -> config -> data file, from the layout check)."""
    readme = ctx.final / "README.md"
    fix = "render it again (sniff-qk render-readme --config ...)"
    if not readme.is_file():
        if layout:
            ctx.problem(readme, f"is missing, so load_dataset finds no configs; {fix}")
        return
    if ctx.front is None:
        return  # reported when it was read
    configs = ctx.front.get("configs")
    if configs is None:
        if layout:
            ctx.problem(readme, f"front matter has no configs: list; {fix}")
        return
    if not isinstance(configs, list):
        ctx.problem(readme, f"configs: is a {type(configs).__name__}, not a list; {fix}")
        return
    parts = {s: {c: CONFIG_RE.match(c).groups() for c in cfgs} for s, cfgs in layout.items()}
    rel_files = {s: {c: ctx.rel(p)[len("final/"):] for c, p in cfgs.items()} for s, cfgs in layout.items()}

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
        ctx.problem(readme, f"no config lists split {split!r}, which has {len(layout[split])} config file(s) "
                            f"under final/data/{split}/; {fix}")
    for split in sorted(s for s in mentioned - set(layout) if isinstance(s, str)):
        ctx.problem(readme, f"lists split {split!r}, which has no files under final/data/{split}/; {fix}")
    skip = (set(layout) ^ mentioned)
    seen: set[str] = set()
    defaults = []
    glob_cache: dict[str, set[str]] = {}
    for i, entry in enumerate(configs):
        if not isinstance(entry, dict) or not isinstance(entry.get("config_name"), str):
            ctx.problem(readme, f"configs[{i}] has no config_name; {fix}")
            continue
        name = entry["config_name"]
        if name in seen:
            ctx.problem(readme, f"config {name!r} is listed more than once; {fix}")
            continue
        seen.add(name)
        if entry.get("default"):
            defaults.append(name)
        want = members(name)
        if want is None:
            ctx.warn(readme, f"config {name!r} is not a name qk-sniffer writes; its files were not checked")
            continue
        listed = _entry_files(ctx, readme, name, entry.get("data_files"), glob_cache, fix)
        if listed is None:
            continue
        for split in sorted((set(listed) | set(want)) - skip):
            got, exp = listed.get(split), want.get(split, set())
            if got is None:
                ctx.problem(readme, f"config {name!r} lists no data files for split {split!r}, which has "
                                    f"{named(sorted(exp))}; {fix}")
            elif not exp and not got:
                ctx.problem(readme, f"config {name!r} lists split {split!r} but its paths match no file "
                                    f"(the config has no data there); {fix}")
            elif not exp:
                ctx.problem(readme, f"config {name!r} lists split {split!r}, which has no files of it, and "
                                    f"matches {named(sorted(got))}; {fix}")
            elif got != exp:
                extra, lacking = sorted(got - exp), sorted(exp - got)
                what = []
                if extra:
                    what.append(f"also match {named(extra)}")
                if lacking:
                    what.append(f"miss {named(lacking)}")
                ctx.problem(readme, f"config {name!r}, split {split!r}: its paths {' and '.join(what)}; {fix}")
    for name in sorted(required - seen, key=lambda n: (n != "all", n)):
        where = sorted(s for s, f in (members(name) or {}).items() if f and s not in skip)
        if not where:
            continue
        ctx.problem(readme, f"lists no config {name!r} although split(s) {', '.join(where)} have its files, so "
                            f"load_dataset cannot load it by name; {fix}")
    if len(defaults) > 1:
        ctx.problem(readme, f"more than one config is marked default ({', '.join(defaults)}); datasets allows "
                            f"one; {fix}")

def _entry_files(ctx: VerifyContext, readme: Path, name: str, data_files, cache: dict[str, set[str]],
                 fix: str) -> dict[str, set[str]] | None:
    """Split -> files the entry's globs match on disk, or None after reporting a malformed entry."""
    if not isinstance(data_files, list) or not data_files:
        ctx.problem(readme, f"config {name!r}: data_files must be a non-empty list of {{split, path}} items; "
                            f"{fix}")
        return None
    out: dict[str, set[str]] = {}
    for item in data_files:
        if not isinstance(item, dict) or set(item) != {"split", "path"}:
            ctx.problem(readme, f"config {name!r}: data_files item {item!r} must have exactly the keys split "
                                f"and path; {fix}")
            return None
        split, paths = item["split"], item["path"]
        if not isinstance(split, str) or not SPLIT_RE.fullmatch(split):
            ctx.problem(readme, f"config {name!r}: split {split!r} is not a valid split name; {fix}")
            return None
        if split in out:
            ctx.problem(readme, f"config {name!r} lists split {split!r} twice; {fix}")
            return None
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            ctx.problem(readme, f"config {name!r}, split {split!r}: path must be a glob or a list of globs; "
                                f"{fix}")
            return None
        matched: set[str] = set()
        for pattern in paths:
            pp = PurePosixPath(pattern)
            if pp.is_absolute() or ".." in pp.parts or "://" in pattern:
                ctx.problem(readme, f"config {name!r}, split {split!r}: path {pattern!r} must be relative to "
                                    f"the dataset folder; {fix}")
                return None
            if pattern not in cache:
                cache[pattern] = {
                    r for p in ctx.final.glob(pattern) if p.is_file()
                    and not _hidden(r := p.relative_to(ctx.final).as_posix())
                }
            matched |= cache[pattern]
        out[split] = matched
    return out
