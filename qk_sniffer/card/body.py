"""The card's generated section: the markdown between the ``BEGIN`` and ``END`` markers of ``final/README.md``.

Its text is the Jinja2 template ``templates/card_body.md.j2``. This module works out what the template shows
(per split: the layers and heads captured, which optional rows apply, the rows per config group) and passes the
formatting of single values as filters: ``code`` (a value in backticks, ``-`` for none), ``ranges`` (``0-3, 5``),
``thousands`` (``1,234``), ``json`` and ``positions`` (the positions a bucket spans under a sampler).
``replace_section`` puts a new section in place of the old one and keeps everything around it (the user's text).
"""

from __future__ import annotations

import json

import jinja2

from ..sampling import log_uniform_floor
from .configs import VIEWER_MAX_CONFIGS, VIEWER_MAX_SPLITS, config_parts

BEGIN = "<!-- qk-sniffer:begin -->"
END = "<!-- qk-sniffer:end -->"
TEMPLATE = "card_body.md.j2"


def positions(bucket: int, sampling: dict) -> str:
    """The positions ``bucket`` spans under ``sampling`` (``lo-hi``), ``-`` for a sampler that is not this project's."""
    if sampling.get("type") not in ("log_uniform", "uniform", "all"):
        return "-"  # not this project's sampler (rows migrated from the original tool): its buckets are not known
    s = int(sampling.get("min_bucket_size") or 1)
    if sampling.get("type") == "log_uniform":
        p0 = log_uniform_floor(s)
        lo = 0 if bucket <= p0 else (1 << bucket) - 1
        return f"{lo}-{(1 << (bucket + 1)) - 2}"
    return f"{bucket * s}-{(bucket + 1) * s - 1}"


def code(v) -> str:
    """A value in backticks; ``-`` for None or an empty string."""
    return "-" if v is None or v == "" else f"`{v}`"


def ranges(values: list[int]) -> str:
    """Sorted integers as runs: ``[0, 1, 2, 5]`` -> ``0-2, 5``; ``none`` for no value."""
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


def _thousands(v) -> str:
    return f"{v:,}"


def _json(v, sort_keys: bool = False) -> str:
    return json.dumps(v, sort_keys=sort_keys)


_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("qk_sniffer.card", "templates"),
    autoescape=False,  # markdown, not HTML
    trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters.update(code=code, ranges=ranges, thousands=_thousands, json=_json, positions=positions)


def _split_context(split: str, meta: dict, configs: list[str], groups: dict | None) -> dict:
    """What the template shows of one split: values from its record, and which optional rows apply."""
    model, ds, smp = meta.get("model") or {}, meta.get("dataset") or {}, meta.get("sampling") or {}
    windows = meta.get("layer_windows")
    post = meta.get("post_rotation_transform") or {}
    hs = meta.get("head_sampling")
    return {
        "split": split,
        "model_name": model.get("name"), "revision": model.get("revision"), "dtype": model.get("dtype"),
        "attn_implementation": model.get("attn_implementation"),
        "ds_path": ds.get("path"), "ds_name": ds.get("name"), "ds_split": ds.get("split"),
        "text_column": ds.get("text_column"), "max_samples": ds.get("max_samples"),
        "sampling": smp,
        "n_configs": len(configs),
        "layers": sorted({int(config_parts(n)[0]) for n in configs}),
        "query_heads": sorted({int(config_parts(n)[1]) for n in configs if n.endswith("q")}),
        "key_heads": sorted({int(config_parts(n)[1]) for n in configs if n.endswith("k")}),
        # the row shows the layers with a window; it is there when any layer's window is known
        "windows": [(i, w) for i, w in enumerate(windows) if w] if windows and any(w is not None for w in windows)
        else None,
        "chunked": [(i, a.split(":", 1)[-1]) for i, a in enumerate(meta.get("layer_attention") or [])
                    if a.startswith("chunked")],
        "rope_layers": meta.get("rope_layers"),
        "pre_rope": bool(smp.get("capture_pre_rope")),
        "rope_unknown_layers": meta.get("rope_unknown_layers"),
        "post_rotation": [(k, post[k]) for k in ("q", "k") if post.get(k)] if any(post.values()) else None,
        "skipped_layers": list(meta["skipped_layers"].items()) if meta.get("skipped_layers") else None,
        "head_sampling": {k: hs.get(k) for k in ("seed", "selected", "candidates", "requested")}
        | {"query_heads": hs.get("query_heads") or []} if hs else None,
        "rows_total": meta.get("rows_total", 0),
        "updated_at": meta.get("updated_at", "-"),
        "previous_sampling": meta.get("previous_sampling"),
        "rows_per_bucket": meta.get("rows_per_bucket") or [],
        "groups": groups if groups and groups.get("layers") else None,
        "group_layers": [(layer, sum(1 for n in configs if int(config_parts(n)[0]) == layer), v)
                         for layer, v in groups["layers"].items()] if groups and groups.get("layers") else [],
        "first_config": next((n for n in configs if n.endswith("q")), configs[0] if configs else "all"),
    }


def generated_body(splits: dict[str, list[str]], metas: dict[str, dict], repo: str, n_configs: int,
                   groups: dict | None = None, figure: str | None = None) -> str:
    """The section between the markers (both included, no newline after ``END``): what the configs hold, the
    card's figure, warnings past the viewer's limits, and one part per split (sorted by name)."""
    return _ENV.get_template(TEMPLATE).render(
        BEGIN=BEGIN, END=END, figure=figure, repo=repo, n_configs=n_configs, n_splits=len(splits),
        max_configs=VIEWER_MAX_CONFIGS, max_splits=VIEWER_MAX_SPLITS,
        splits=[_split_context(s, metas.get(s) or {}, splits[s], (groups or {}).get(s)) for s in sorted(splits)],
    )


def replace_section(body: str, section: str) -> str:
    """``body`` with ``section`` in place of its old generated section, or appended when it has none."""
    b, e = body.find(BEGIN), body.find(END)
    if b != -1 and e != -1 and e > b:
        return body[:b] + section + body[e + len(END):]
    body = body.rstrip("\n")
    return (body + "\n\n" if body.strip() else "\n") + section + "\n"
