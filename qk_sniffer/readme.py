"""``render-readme``: the dataset card (README.md: "What you get" and "Hub").

The front matter's ``configs:`` lists every concrete config found under
``final/data/<split>/<config>/data.parquet`` and the aggregates ``all`` (default), ``all_q``,
``all_k``, ``layerLL``, ``layerLL_q``, ``layerLL_k`` and ``lLLhHH``; each lists, per split, paths
or globs that match exactly its configs, and only the splits that have them. The ``qk_sniffer:``
key records per-split run metadata (model, dataset, sampling, rows per bucket), which
``merge_staging`` reads back to refuse appending with different sampling settings.

Other front-matter keys (license, tags, ...) and the body outside the
``<!-- qk-sniffer:begin -->`` / ``<!-- qk-sniffer:end -->`` markers belong to the user and are
kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import legacy
from .config import data_root, sampling_settings, split_name
from .front_matter import read_front_matter
from .layout import CONFIG_RE, atomic_write_text, final_dir, parse_config_name, remove_stale_temps
from .records import utc_now
from .report import render_card_figure, rows_per_group
from .sampling import log_uniform_floor
from .store import bucket_counts, final_configs, merged_record

BEGIN = "<!-- qk-sniffer:begin -->"
END = "<!-- qk-sniffer:end -->"
VIEWER_MAX_CONFIGS = 3000  # the Hub's dataset viewer handles "a few thousand" configs
VIEWER_MAX_SPLITS = 30
OWN_KEYS = ("configs", "qk_sniffer")


# -- configs ----------------------------------------------------------------------------------


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


def _parts(name: str) -> tuple[str, str, str]:
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
    layers = sorted({_parts(n)[0] for s in split_names for n in splits[s]}, key=lambda x: (int(x), x))
    for lay in layers:
        add(f"layer{lay}", {s: f"data/{s}/l{lay}h*/*.parquet" for s in split_names
                            if any(_parts(n)[0] == lay for n in splits[s])})
        for kind in ("q", "k"):
            add(f"layer{lay}_{kind}", {s: f"data/{s}/l{lay}h*{kind}/*.parquet" for s in split_names
                                       if any(_parts(n)[0] == lay and n.endswith(kind) for n in splits[s])})
    heads = sorted({n[:-1] for s in split_names for n in splits[s]},
                   key=lambda x: (int(_parts(x + "q")[0]), int(_parts(x + "q")[1]), x))
    for hd in heads:
        add(hd, {s: [f"data/{s}/{hd}{k}/*.parquet" for k in ("q", "k") if f"{hd}{k}" in splits[s]]
                 for s in split_names})
    concrete = sorted({n for s in split_names for n in splits[s]},
                      key=lambda x: (int(_parts(x)[0]), int(_parts(x)[1]), _parts(x)[2] == "k", x))
    for name in concrete:
        add(name, {s: f"data/{s}/{name}/*.parquet" for s in split_names if name in splits[s]})
    return entries


# -- metadata ---------------------------------------------------------------------------------


def _disk_stats(final: Path, split: str) -> tuple[int, list[dict]]:
    """Rows and rows per bucket of a split read from its files (only the bucket column)."""
    per: dict[int, dict[str, int]] = {}
    total = 0
    for name, path in final_configs(final, split).items():
        n, counts = bucket_counts(None, path)
        total += n
        kind = parse_config_name(name)[2]
        for b, c in counts.items():
            per.setdefault(b, {"q": 0, "k": 0})[kind] += c
    return total, [{"bucket": b, **per[b]} for b in sorted(per)]


def _bucket_table(buckets: dict) -> list[dict]:
    rows: dict[int, dict[str, int]] = {}
    for kind, counts in buckets.items():
        for b, n in counts.items():
            rows.setdefault(int(b), {"q": 0, "k": 0})[kind] = int(n)
    return [{"bucket": b, "q": rows[b]["q"], "k": rows[b]["k"]} for b in sorted(rows)]


def _cfg_meta(cfg: dict) -> dict:
    m, d = cfg["model"], cfg["dataset"]
    return {
        "model": {"name": m["name"], "revision": m.get("revision"), "dtype": m["dtype"],
                  "attn_implementation": m["attn_implementation"]},
        "dataset": {k: d.get(k) for k in ("path", "name", "split", "text_column", "id_column", "max_samples")},
        "sampling": sampling_settings(cfg),
    }


def split_meta(cfg: dict, final: Path, split: str, configs: list[str], previous: dict | None) -> dict:
    """Metadata of the split this run writes, from ``.merged.json`` (else the previous card, else the config)."""
    prev = dict(previous or {})
    meta = {k: v for k, v in prev.items() if k != "updated_at"}
    merged = merged_record(final, split)
    run = merged.run if merged is not None else None
    if run:  # this run merged chunks: its model, dataset and sampling describe the split now
        model = run.get("model") or {}
        meta["model"] = {k: model.get(k) for k in ("name", "revision", "dtype", "attn_implementation",
                                                   "num_layers", "num_heads", "num_kv_heads", "head_dim")}
        meta["dataset"] = run.get("dataset")
        meta["layer_windows"] = model.get("layer_windows")
        for key in ("layer_attention", "rope_layers", "rope_unknown_layers", "post_rotation_transform", "skipped_layers",
                    "head_sampling"):
            if model.get(key) is not None:
                meta[key] = model[key]
        if model.get("head_sampling") is None:  # this run captured every selected head
            meta.pop("head_sampling", None)
        meta["sampling"] = merged.sampling or run.get("sampling")
        mixed = merged.mixed_sampling
        if mixed:
            history = list(meta.get("previous_sampling") or [])
            if mixed.get("recorded") not in history:
                history.append(mixed["recorded"])
            meta["previous_sampling"] = history
    for key, value in _cfg_meta(cfg).items():  # nothing recorded yet: what the config says
        meta.setdefault(key, value)
    if merged is not None:
        meta["rows_per_bucket"] = _bucket_table(merged.buckets)
        meta["rows_total"] = merged.rows_split_total
    else:
        meta["rows_total"], meta["rows_per_bucket"] = _disk_stats(final, split)
    meta["configs"] = len(configs)
    meta["updated_at"] = prev["updated_at"] if prev.get("updated_at") and _same(prev, meta) else \
        ((merged.merged_at if merged is not None else None) or utc_now())
    return meta


def _same(a: dict, b: dict) -> bool:
    strip = lambda d: json.dumps({k: v for k, v in d.items() if k != "updated_at"}, sort_keys=True)  # noqa: E731
    return strip(a) == strip(b)


# -- body -------------------------------------------------------------------------------------


def _positions(bucket: int, sampling: dict) -> str:
    if sampling.get("type") not in ("log_uniform", "uniform", "all"):
        return "-"  # not this project's sampler (rows migrated from the original tool): its buckets are not known
    s = int(sampling.get("min_bucket_size") or 1)
    if sampling.get("type") == "log_uniform":
        p0 = log_uniform_floor(s)
        lo = 0 if bucket <= p0 else (1 << bucket) - 1
        return f"{lo}-{(1 << (bucket + 1)) - 2}"
    return f"{bucket * s}-{(bucket + 1) * s - 1}"


def _fmt(v) -> str:
    return "-" if v is None or v == "" else f"`{v}`"


def _split_body(split: str, meta: dict, configs: list[str], repo: str, groups: dict | None = None) -> list[str]:
    model, ds, smp = meta.get("model") or {}, meta.get("dataset") or {}, meta.get("sampling") or {}
    layers = sorted({int(_parts(n)[0]) for n in configs})
    qh = sorted({int(_parts(n)[1]) for n in configs if n.endswith("q")})
    kh = sorted({int(_parts(n)[1]) for n in configs if n.endswith("k")})
    source = f"`{ds.get('path')}`" + (f" (config `{ds['name']}`)" if ds.get("name") else "")
    sampler = ", ".join(f"{k} `{json.dumps(v)}`" for k, v in smp.items())
    windows = meta.get("layer_windows")
    out = [
        f"### Split `{split}`",
        "",
        "| | |",
        "|---|---|",
        f"| Model | {_fmt(model.get('name'))} |",
        f"| Revision | {_fmt(model.get('revision'))} |",
        f"| dtype | {_fmt(model.get('dtype'))} |",
        f"| Attention implementation | {_fmt(model.get('attn_implementation'))} |",
        f"| Source dataset | {source}, split {_fmt(ds.get('split'))}, text column {_fmt(ds.get('text_column'))}"
        + (f", first {ds['max_samples']} rows" if ds.get("max_samples") else "") + " |",
        f"| Sampler | {sampler} |",
        f"| Configs captured | {len(configs)}: layers {_ranges(layers)}, query heads {_ranges(qh)}, "
        f"key heads {_ranges(kh)} |",
    ]
    if windows and any(w is not None for w in windows):
        out.append(f"| Sliding windows | {', '.join(f'layer {i}: {w}' for i, w in enumerate(windows) if w)} |")
    chunked = [(i, a.split(":", 1)[-1]) for i, a in enumerate(meta.get("layer_attention") or []) if a.startswith("chunked")]
    if chunked:
        out.append(f"| Chunked attention | {', '.join(f'layer {i}: chunks of {c}' for i, c in chunked)} "
                   "(a token sees only earlier tokens of its own chunk; `sliding_window` is null there) |")
    if meta.get("rope_layers") is not None:
        note = "pre-RoPE capture: the other layers store what attention receives" if smp.get("capture_pre_rope") \
            else "vectors are post-RoPE"
        out.append(f"| Layers with RoPE | {_ranges(meta['rope_layers'])} ({note}) |")
    if meta.get("rope_unknown_layers"):
        out.append(f"| RoPE not identified | layers {_ranges(meta['rope_unknown_layers'])} |")
    post = meta.get("post_rotation_transform") or {}
    if any(post.values()):
        which = "; ".join(f"{k}: layers {_ranges(post[k])}" for k in ("q", "k") if post.get(k))
        out.append(f"| Transform after the rotation | {which}"
                   + " (a norm or scaling after RoPE: post-RoPE vectors are what attention receives, transform included) |")
    if meta.get("skipped_layers"):
        out.append("| Layers not captured | " + "; ".join(f"layer {i}: {why}" for i, why in meta["skipped_layers"].items())
                   + " |")
    hs = meta.get("head_sampling")
    if hs:
        out.append(f"| Head sampling | seed `{hs.get('seed')}`: {hs.get('selected')} of {hs.get('candidates')} (layer, query "
                   f"head) pairs ({hs.get('requested')} requested): "
                   + ", ".join(f"l{p[0]}h{p[1]}" for p in hs.get("query_heads") or []) + " |")
    out += [f"| Rows | {meta.get('rows_total', 0):,} |", f"| Updated | {meta.get('updated_at', '-')} |", ""]
    if meta.get("previous_sampling"):
        out += ["Warning: rows of this split were also captured with other sampling settings: "
                + "; ".join(json.dumps(p, sort_keys=True) for p in meta["previous_sampling"]), ""]
    table = meta.get("rows_per_bucket") or []
    if table:
        out += ["Rows per bucket (all captured heads of a kind together):", "",
                "| bucket | positions | query rows | key rows |", "|---:|---|---:|---:|"]
        out += [f"| {r['bucket']} | {_positions(r['bucket'], smp)} | {r['q']:,} | {r['k']:,} |" for r in table]
        out.append("")
    if groups and groups.get("layers"):
        out += ["Rows per config group:", "", "| group | configs | query rows | key rows |", "|---|---:|---:|---:|",
                f"| all | {len(configs)} | {groups['q']:,} | {groups['k']:,} |"]
        out += [f"| `layer{layer:02d}` | {sum(1 for n in configs if int(_parts(n)[0]) == layer)} | {v['q']:,} | "
                f"{v['k']:,} |" for layer, v in groups["layers"].items()]
        out.append("")
    first = next((n for n in configs if n.endswith("q")), configs[0] if configs else "all")
    out += ["```python", "from datasets import load_dataset", "",
            f'ds = load_dataset("{repo}", "{first}", split="{split}")', "```", ""]
    return out


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)


def generated_body(splits: dict[str, list[str]], metas: dict[str, dict], repo: str, n_configs: int,
                   groups: dict | None = None, figure: str | None = None) -> str:
    out = [
        BEGIN,
        "<!-- written by qk-sniffer's render_readme: edits between these markers are replaced -->",
        "",
        "## Captured query and key vectors",
        "",
        "Each row is one sampled query or key vector of one attention head at one token position.",
        "Columns: `bucket` (position bucket of the sampler), `example_id`, `position` (0-based token index, padding "
        "excluded), `vector` (the head's vector), `sliding_window` (the layer's window, null for full attention), "
        "`layer`, `head`, `kind` (`q` or `k`).",
        "",
        "Configs: `lLLhHHq` / `lLLhHHk` for one head, and the aggregates `all` (default), `all_q`, `all_k`, "
        "`layerLL`, `layerLL_q`, `layerLL_k` and `lLLhHH` (the `q` and `k` configs of head index HH). Key heads are "
        "the model's key/value heads: in a model with grouped-query attention, query head h reads key head "
        "h // (query heads / key heads). Splits are models.",
        "",
    ]
    if figure:
        out += [f"![Rows per position bucket, all layers]({figure})", ""]
    if n_configs > VIEWER_MAX_CONFIGS:
        out += [f"> **Note:** this card lists {n_configs:,} configs; the Hub's dataset viewer shows a few "
                f"thousand at most (this card warns above {VIEWER_MAX_CONFIGS:,}), so some configs are not "
                "browsable there. `load_dataset` loads every one of them.", ""]
    if len(splits) > VIEWER_MAX_SPLITS:
        out += [f"> **Note:** this dataset has {len(splits)} splits; the Hub's dataset viewer handles about "
                f"{VIEWER_MAX_SPLITS}. `load_dataset` loads every one of them.", ""]
    for split in sorted(splits):
        out += _split_body(split, metas.get(split) or {}, splits[split], repo, (groups or {}).get(split))
    out.append(END)
    return "\n".join(out)


def _replace_section(body: str, section: str) -> str:
    b, e = body.find(BEGIN), body.find(END)
    if b != -1 and e != -1 and e > b:
        return body[:b] + section + body[e + len(END):]
    body = body.rstrip("\n")
    return (body + "\n\n" if body.strip() else "\n") + section + "\n"


# -- the stage --------------------------------------------------------------------------------


def render_card(cfg: dict, final: Path) -> str:
    readme = final / "README.md"
    fm, body = read_front_matter(readme) if readme.is_file() else ({}, "")
    split = split_name(cfg)
    splits = discover(final)
    previous = ((fm.get("qk_sniffer") or {}).get("splits") or {}) if isinstance(fm.get("qk_sniffer"), dict) else {}
    metas: dict[str, dict] = {}
    for s, configs in splits.items():
        if s == split:
            metas[s] = split_meta(cfg, final, s, configs, previous.get(s))
        elif previous.get(s):
            metas[s] = {**previous[s], "configs": len(configs)}
        else:  # a split on disk that no card describes (copied in by hand): what the files say
            total, table = _disk_stats(final, s)
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
    body = _replace_section(body, section)
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
    if not readme.is_file() or readme.read_text(encoding="utf-8") != text:
        atomic_write_text(readme, text)
    copy_to = cfg["output"].get("readme_path")
    if copy_to:
        dest = Path(copy_to)
        if not dest.is_file() or dest.read_text(encoding="utf-8") != text:
            atomic_write_text(dest, text)
    return readme
