"""What the card's front matter records per split (``qk_sniffer: splits: <split>:``).

``split_meta`` builds the record of the split a run writes: model, dataset and sampling from the latest merge
(``final/.merged.json``), else from the previous card, else from the config; rows in total and per bucket; the
number of configs; ``updated_at``, kept when nothing else changed so that an unchanged dataset renders an
unchanged card. ``merge_staging`` reads the recorded sampling back to refuse appending with other settings.
``disk_stats`` counts the rows of a split no record describes from its files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import sampling_settings
from ..layout import parse_config_name
from ..records import utc_now
from ..store import bucket_counts, final_configs, merged_record


def disk_stats(final: Path, split: str) -> tuple[int, list[dict]]:
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
        meta["rows_total"], meta["rows_per_bucket"] = disk_stats(final, split)
    meta["configs"] = len(configs)
    meta["updated_at"] = prev["updated_at"] if prev.get("updated_at") and _same(prev, meta) else \
        ((merged.merged_at if merged is not None else None) or utc_now())
    return meta


def _same(a: dict, b: dict) -> bool:
    strip = lambda d: json.dumps({k: v for k, v in d.items() if k != "updated_at"}, sort_keys=True)  # noqa: E731
    return strip(a) == strip(b)
