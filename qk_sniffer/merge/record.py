"""What ``final/.merged.json`` records of a merge: per config the rows added and in total, which way each
touched config was written (``methods``), conflicts and rounding differences, rows per bucket, the chunks
merged and a summary of the run that staged them."""

from __future__ import annotations

import logging
import time

from ..layout import parse_config_name
from ..records import ChunkManifest, MergeRecord, utc_now
from ..store import bucket_counts, final_configs
from .inputs import MergeInputs
from .rounding import ROUNDING_RTOL

log = logging.getLogger("qk_sniffer")




def merge_record(inputs: MergeInputs, done: dict[str, tuple[str, dict, int, dict]], t0: float) -> MergeRecord:
    """The content of ``final/.merged.json``: ``done`` holds what each config's append or rewrite returned
    (``(config, stats, rows in the file, rows per bucket)``); configs it does not name are counted from their
    files. Warns about conflicts; ``t0`` is when the merge began (``time.perf_counter``)."""
    final, split, chunks, incomplete = inputs.final, inputs.split, inputs.chunks, inputs.incomplete
    rows_added: dict[str, int] = {}
    touched: list[str] = []
    methods: dict[str, int] = {"append": 0, "rewrite": 0}
    conflicts: dict[str, dict] = {}
    rounding: dict[str, dict] = {}
    bucket_rows: dict[str, dict[int, int]] = {"q": {}, "k": {}}
    rows_total: dict[str, int] = {}
    for cfg_name, stats, n, counts in (done[name] for name in sorted(done)):
        rows_added[cfg_name] = stats["added"]
        if stats["conflicts"]:
            conflicts[cfg_name] = {"count": stats["conflicts"], "examples": stats["conflict_examples"]}
            log.warning("%s/%s: %d staged rows conflict with final rows (final rows kept)", split, cfg_name,
                        stats["conflicts"])
        if stats["rounding"]:
            rounding[cfg_name] = {"count": stats["rounding"], "max_relative_difference": stats["rounding_max"]}
        if stats["changed"]:
            touched.append(cfg_name)
            methods[stats["method"]] += 1
        if n:
            rows_total[cfg_name] = n
            _add_bucket_counts(bucket_rows, cfg_name, counts)
    for cfg_name, fpath in final_configs(final, split).items():
        if cfg_name not in rows_total:
            rows_total[cfg_name], counts = bucket_counts(None, fpath)
            _add_bucket_counts(bucket_rows, cfg_name, counts)

    merge_s = time.perf_counter() - t0
    result = MergeRecord(**{
        "split": split,
        "merged_at": utc_now(),
        "config_fingerprint": inputs.fingerprint,
        "sampling": inputs.sampling,
        "mixed_sampling": inputs.mixed,
        "configs_touched": touched,
        "methods": methods,
        "rows_added": rows_added,
        "rows_added_total": int(sum(rows_added.values())),
        "rows_total": dict(sorted(rows_total.items())),
        "rows_split_total": int(sum(rows_total.values())),
        "configs": len(rows_total),
        "conflicts": conflicts,
        "conflicts_total": int(sum(c["count"] for c in conflicts.values())),
        # staged rows whose vector differs from the kept one by float rounding only (ROUNDING_RTOL), not counted above
        "rounding_differences": rounding,
        "rounding_differences_total": int(sum(r["count"] for r in rounding.values())),
        "rounding_max_relative_difference": max((r["max_relative_difference"] for r in rounding.values()),
                                                default=0.0),
        "rounding_tolerance": dict(ROUNDING_RTOL),
        "chunks": [
            {"chunk": m.chunk, "example_range": m.example_range, "examples": m.examples, "tokens": m.tokens,
             "rows": m.total_rows}
            for _, m in chunks
        ],
        "incomplete_chunks": incomplete,
        "run": _run_summary([m for _, m in chunks]),
        "buckets": {kind: {str(b): n for b, n in sorted(v.items())} for kind, v in sorted(bucket_rows.items()) if v},
        "merge_s": round(merge_s, 3),
    })
    if rounding:
        log.info("split %r: %d staged rows in %d configs differ from the rows kept by float rounding only (at most "
                 "%.2g relative; .merged.json: rounding_differences): not conflicts, the kept rows stay", split,
                 result.rounding_differences_total, len(rounding), result.rounding_max_relative_difference)
    return result


def _add_bucket_counts(bucket_rows: dict[str, dict[int, int]], cfg_name: str, counts: dict[int, int]) -> None:
    """Add a config's rows per bucket to those of its kind (``q`` or ``k``)."""
    parsed = parse_config_name(cfg_name)
    per = bucket_rows.setdefault(parsed[2] if parsed else "?", {})
    for b, c in counts.items():
        per[b] = per.get(b, 0) + c


def _run_summary(manifests: list[ChunkManifest]) -> dict | None:
    """Model, dataset, sampling, devices and summed timings of the chunks merged (None when there are none)."""
    if not manifests:
        return None
    first = manifests[0]

    def timing(key: str) -> float:  # a timing a chunk did not record (null) counts as 0
        return sum(m.timings.get(key) or 0 for m in manifests)

    forward = timing("forward_s")
    tokens = sum(m.tokens for m in manifests)
    return {
        "model": first.model,
        "dataset": first.dataset,
        "sampling": first.sampling,
        "chunk_size": first.chunk_size,
        "devices": sorted({str(m.device) for m in manifests}),
        "versions": first.versions,
        "timings": {
            "chunks": len(manifests),
            "examples": sum(m.examples for m in manifests),
            "tokens": tokens,
            "computed_tokens": sum(m.computed_tokens for m in manifests),
            "load_s": round(timing("load_s"), 3),
            "forward_s": round(forward, 3),
            "total_s": round(timing("total_s"), 3),
            "tokens_per_s": round(tokens / forward, 1) if forward > 0 else None,
        },
    }
