"""The configs of the dataset card: which splits and configs are on disk, and the front matter's ``configs:`` list.

``discover`` finds every concrete config (``final/data/<split>/<config>/data.parquet``); ``build_configs`` lists
the aggregates ``all`` (default), ``all_q``, ``all_k``, ``layerLL``, ``layerLL_q``, ``layerLL_k`` and ``lLLhHH``
followed by the concrete configs, each with, per split, paths or globs that match exactly its configs, and only
the splits that have them. The viewer limits are how many configs and splits the Hub's dataset viewer handles;
the card's body warns beyond them.
"""

from __future__ import annotations

from pathlib import Path

from ..layout import CONFIG_RE
from ..store import final_configs

VIEWER_MAX_CONFIGS = 3000  # the Hub's dataset viewer handles "a few thousand" configs
VIEWER_MAX_SPLITS = 30


def discover(final: Path) -> dict[str, list[str]]:
    """Split -> sorted concrete config names with a ``data.parquet`` on disk."""
    base = final / "data"
    out: dict[str, list[str]] = {}
    if not base.is_dir():
        return out
    for d in sorted(base.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            names = sorted(final_configs(final, d.name))
            if names:
                out[d.name] = names
    return out


def config_parts(name: str) -> tuple[str, str, str]:
    """``(layer digits, head digits, kind)`` of a concrete config name, the digits as written (widths kept)."""
    m = CONFIG_RE.match(name)
    return m.group(1), m.group(2), m.group(3)


def build_configs(splits: dict[str, list[str]]) -> list[dict]:
    """The ``configs:`` list: aggregates first (``all`` is the default), then the concrete configs."""
    split_names = sorted(splits)
    entries: list[dict] = []

    def add(name: str, per_split: dict[str, str | list[str]], default: bool = False) -> None:
        files = [{"split": s, "path": per_split[s]} for s in split_names if per_split.get(s)]
        if not files:
            return
        entry: dict = {"config_name": name}
        if default:
            entry["default"] = True
        entry["data_files"] = files
        entries.append(entry)

    add("all", {s: f"data/{s}/*/*.parquet" for s in split_names}, default=True)
    for kind in ("q", "k"):
        add(f"all_{kind}", {s: f"data/{s}/*{kind}/*.parquet" for s in split_names
                            if any(n.endswith(kind) for n in splits[s])})
    # layer digits keep their width (l000h.. in a model with > 99 layers), so ``l00h*`` never matches ``l000h..``
    layers = sorted({config_parts(n)[0] for s in split_names for n in splits[s]}, key=lambda x: (int(x), x))
    for lay in layers:
        add(f"layer{lay}", {s: f"data/{s}/l{lay}h*/*.parquet" for s in split_names
                            if any(config_parts(n)[0] == lay for n in splits[s])})
        for kind in ("q", "k"):
            add(f"layer{lay}_{kind}", {s: f"data/{s}/l{lay}h*{kind}/*.parquet" for s in split_names
                                       if any(config_parts(n)[0] == lay and n.endswith(kind) for n in splits[s])})
    heads = sorted({n[:-1] for s in split_names for n in splits[s]},
                   key=lambda x: (int(config_parts(x + "q")[0]), int(config_parts(x + "q")[1]), x))
    for hd in heads:
        add(hd, {s: [f"data/{s}/{hd}{k}/*.parquet" for k in ("q", "k") if f"{hd}{k}" in splits[s]]
                 for s in split_names})
    concrete = sorted({n for s in split_names for n in splits[s]},
                      key=lambda x: (int(config_parts(x)[0]), int(config_parts(x)[1]), config_parts(x)[2] == "k", x))
    for name in concrete:
        add(name, {s: f"data/{s}/{name}/*.parquet" for s in split_names if name in splits[s]})
    return entries
