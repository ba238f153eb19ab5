"""``capture.head_sampling``: the (layer, query head) pairs the original tool picked.

The candidates are the (layer, query head) pairs left by ``capture.layers``, ``capture.heads`` and
``capture.full_attention_only``, layer-major and head-minor (both ascending). The selection is
``random.Random(seed).sample(candidates, min(count, len(candidates)))``, so a dataset continued here
holds the same heads as one the original tool made; each selected query head brings the key/value
head it reads, ``q // (n_q // n_kv)``.
"""

from __future__ import annotations

import random

from .config import ConfigError


def kv_head(query_head: int, n_q: int, n_kv: int) -> int:
    """The key/value head a query head reads (grouped-query attention)."""
    return query_head // max(n_q // max(n_kv, 1), 1)


def sample_heads(layers: list[int], query_heads: list[int], count: int, seed: int) -> list[tuple[int, int]]:
    """The selected (layer, query head) pairs, in the order ``random.sample`` returns them."""
    candidates = [(layer, head) for layer in sorted(layers) for head in sorted(query_heads)]
    if not candidates:
        raise ConfigError(
            "capture.head_sampling: no (layer, query head) pair is left to sample from after capture.layers, "
            "capture.heads and capture.full_attention_only; widen those filters or remove capture.head_sampling"
        )
    return random.Random(seed).sample(candidates, min(count, len(candidates)))


def heads_by_layer(picked: list[tuple[int, int]], n_q: int, n_kv: int) -> dict[int, dict[str, list[int]]]:
    """``{layer: {"q": query heads, "k": key/value heads}}`` of the selected pairs (sorted)."""
    out: dict[int, dict[str, set[int]]] = {}
    for layer, head in picked:
        entry = out.setdefault(layer, {"q": set(), "k": set()})
        entry["q"].add(head)
        entry["k"].add(kv_head(head, n_q, n_kv))
    return {layer: {kind: sorted(v) for kind, v in entry.items()} for layer, entry in sorted(out.items())}


def selection_record(setting: dict, picked: list[tuple[int, int]], n_candidates: int,
                     by_layer: dict[int, dict[str, list[int]]]) -> dict:
    """What the card records of the selection: seed, requested and selected counts, and the heads."""
    return {
        "seed": int(setting.get("seed") or 0),
        "requested": int(setting["count"]),
        "candidates": n_candidates,
        "selected": len(picked),
        "query_heads": sorted([layer, head] for layer, head in picked),
        "key_heads": [[layer, k] for layer, entry in by_layer.items() for k in entry["k"]],
    }
