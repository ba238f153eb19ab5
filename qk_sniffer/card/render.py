"""The ``render-readme`` stage: ``final/README.md`` from what is on disk and what the card recorded before.

``render_card`` returns the card's text: the front matter (the user's keys kept in their order, ``configs:`` and
``qk_sniffer:`` replaced, see ``OWN_KEYS``) and the body (the user's text kept, the generated section between the
markers replaced). ``render_readme`` writes it atomically, leaves it untouched when unchanged, and copies it to
``output.readme_path`` when set.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .. import legacy
from ..config import data_root, split_name
from ..front_matter import read_front_matter
from ..layout import final_dir, remove_stale_temps, write_text_if_changed
from ..report import rows_per_group
from ..store import card_splits
from .body import generated_body, replace_section
from .configs import build_configs, discover
from .figure import render_card_figure
from .metadata import disk_stats, split_meta

OWN_KEYS = ("configs", "qk_sniffer")  # the front-matter keys the card writes; every other key is the user's


def render_card(cfg: dict, final: Path) -> str:
    """The text of ``final/README.md`` for the dataset under ``final`` (writes only the card's figure)."""
    readme = final / "README.md"
    fm, body = read_front_matter(readme) if readme.is_file() else ({}, "")
    split = split_name(cfg)
    splits = discover(final)
    previous = card_splits(fm)
    metas: dict[str, dict] = {}
    for s, configs in splits.items():
        if s == split:
            metas[s] = split_meta(cfg, final, s, configs, previous.get(s))
        elif previous.get(s):
            metas[s] = {**previous[s], "configs": len(configs)}
        else:  # a split on disk that no card describes (copied in by hand): what the files say
            total, table = disk_stats(final, s)
            metas[s] = {"rows_total": total, "rows_per_bucket": table, "configs": len(configs)}
    entries = build_configs(splits)
    own = {"configs": entries, "qk_sniffer": {"splits": metas}}
    new_fm: dict = {}
    for k, v in fm.items():
        new_fm[k] = own[k] if k in own else v
    for k in OWN_KEYS:
        new_fm.setdefault(k, own[k])
    if not entries:
        new_fm.pop("configs")
    repo = cfg["output"].get("hf_repo_id") or cfg["output"].get("remote_dir") or "path/to/dataset"
    groups, figure = {}, None
    if splits:
        figure = render_card_figure(final.parent).relative_to(final).as_posix()
        groups = rows_per_group(final.parent)
    section = generated_body(splits, metas, repo, len(entries), groups, figure)
    if not body.strip():
        title = cfg["output"].get("hf_repo_id") or split
        body = f"\n# {title}\n"
    body = replace_section(body, section)
    head = yaml.safe_dump(new_fm, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{head}---\n{body}"


def render_readme(cfg: dict, root: Path | None = None) -> Path:
    """Render ``final/README.md`` (atomically, untouched when unchanged) and copy it to ``output.readme_path``."""
    root = Path(root) if root is not None else data_root(cfg)
    final = final_dir(root)
    legacy.refuse_local(root)  # a card listing the original tool's files would publish them as this project's
    final.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    readme = final / "README.md"
    text = render_card(cfg, final)
    write_text_if_changed(readme, text)
    copy_to = cfg["output"].get("readme_path")
    if copy_to:
        write_text_if_changed(Path(copy_to), text)
    return readme
