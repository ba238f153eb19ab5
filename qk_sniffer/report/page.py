"""``run/run_metadata.html``: the model, dataset and sampler of every split and the staged chunks, as tables
rendered from :data:`page_template.RUN_METADATA_TEMPLATE` with Jinja2."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2

from ..layout import atomic_write_text
from .page_template import RUN_METADATA_TEMPLATE

CHUNK_COLUMNS = ("chunk", "split", "examples", "tokens", "rows", "device", "tokens_per_s", "load_s", "forward_s",
                 "total_s")

_TEMPLATE = jinja2.Environment(
    autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
).from_string(RUN_METADATA_TEMPLATE)


def _cell(v) -> str:
    """The text of one table cell: ``-`` for nothing, numbers with thousands separators, containers as JSON."""
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict | list):
        return json.dumps(v, sort_keys=True)
    return str(v)


def metadata_rows(split: str, st: dict, meta: dict) -> list[tuple[str, str, str]]:
    """(section, key, value) rows of the metadata table of one split."""
    rows: list[tuple[str, str, str]] = []
    model = st.get("model") or {}
    for key in ("name", "revision", "dtype", "attn_implementation", "num_layers", "num_heads", "num_kv_heads",
                "head_dim"):
        if key in model:
            rows.append(("model", key, _cell(model[key])))
    windows = meta.get("layer_windows")
    if windows and any(w is not None for w in windows):
        rows.append(("model", "sliding windows", ", ".join(f"layer {i}: {w}" for i, w in enumerate(windows) if w)))
    for key, v in (st.get("dataset") or {}).items():
        rows.append(("dataset", key, _cell(v)))
    for key, v in (st.get("sampling_recorded") or {}).items():
        rows.append(("sampler", key, _cell(v)))
    if meta.get("mixed_sampling") or meta.get("previous_sampling"):
        rows.append(("sampler", "warning", "rows of this split were captured with several sampling settings"))
    rows += [
        ("data", "rows", _cell(st["rows_total"])),
        ("data", "configs", f"{len(st['configs'])} ({st['config_counts']['q']} query, {st['config_counts']['k']} key)"),
        ("data", "examples with rows", _cell(st["examples"])),
        ("data", "vector statistics over", "every row" if (st.get("vector_sample") or {}).get("example_id_below") is None
         else f"examples with id < {st['vector_sample']['example_id_below']} ({st['vector_sample']['rows']} rows)"),
        ("data", "metadata read from", _cell(st.get("metadata_source"))),
    ]
    timings = (meta.get("run") or {}).get("timings") or {}
    for key in ("chunks", "examples", "tokens", "computed_tokens", "load_s", "forward_s", "total_s", "tokens_per_s"):
        if key in timings:
            rows.append(("this run", key, _cell(timings[key])))
    run = meta.get("run") or {}
    if run.get("devices"):
        rows.append(("this run", "devices", ", ".join(map(str, run["devices"]))))
    for key, v in sorted((run.get("versions") or {}).items()):
        rows.append(("versions", key, _cell(v)))
    return rows


def render_metadata_html(stats: dict, metas: dict[str, dict], path: Path) -> Path:
    """Write the metadata page of ``stats`` (:func:`scan.compute_stats`) and each split's recorded ``metas``."""
    splits = [(split, metadata_rows(split, st, metas.get(split, {}))) for split, st in stats["splits"].items()]
    chunks = [[_cell(c.get(k)) for k in CHUNK_COLUMNS] for c in stats["chunks"]]
    atomic_write_text(path, _TEMPLATE.render(splits=splits, columns=CHUNK_COLUMNS, chunks=chunks))
    return Path(path)
