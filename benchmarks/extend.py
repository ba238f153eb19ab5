"""``extend``: a dataset extended to twice its examples vs the same dataset computed fresh.

Both through real ``snakemake`` runs of the whole workflow (chunks, merge, card, verify, push.json, report) on the
tiny benchmark model: a data root of N examples in 4 chunks is extended to 2N (``dataset.max_samples``), against a
fresh run of 2N examples in 4 chunks. The extension runs only the 4 chunks of new examples and appends their rows
to the existing files, so its chunk jobs compute about the new half: the goal (at most 0.6) is on the forward
time the chunks' manifests record. The chunk jobs' whole time (a model load each) and the whole run's wall time are reported next
to it: both arms run four chunk jobs and every stage after them, costs that do not halve and that dominate on the
tiny CPU model (on a real model the forward dominates and the whole run approaches the chunk ratio).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

EXAMPLES = 200  # N: examples of the first run; the extension and the fresh run have 2N (the demo corpus has 400)
REPS = 2


def _write_cfg(path: Path, model_dir: Path, root: Path, max_samples: int) -> Path:
    import yaml

    from .run import REPO

    cfg = {
        "dataset": {"path": "json", "data_files": str(REPO / "config/demo/corpus.jsonl"), "max_samples": max_samples},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "tokenizer": {"max_length": 256},
        "inference": {"batch_size": 8, "device": "cpu"},
        "capture": {"min_bucket_size": 128},
        "output": {"data_root": str(root), "split_name": "bench"},
        "workflow": {"num_chunks": 4, "gpus_per_chunk": 0},
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _timed_run(work: Path, cfg: Path) -> float:
    from .run import _snakemake

    t = time.perf_counter()
    _snakemake(work, cfg)
    return time.perf_counter() - t


def _manifests(root: Path, chunks: list[str]) -> list[dict]:
    return [json.loads((root / "staging" / name / "manifest.json").read_text()) for name in chunks]


def _chunk_seconds(manifests: list[dict], key: str) -> float:
    """A timing the chunk jobs' manifests record (``forward_s``: the model over the examples; ``total_s``: model
    load, forward and writing), summed over the chunks."""
    return sum(m["timings"][key] for m in manifests)


def bench_extend(args, tmp: Path) -> list[dict]:
    from .run import GOALS, build_model

    model = build_model("tiny", tmp / "model-tiny")
    n = EXAMPLES
    ext_s, fresh_s = [], []
    chunk_times: dict[str, list[float]] = {"ext forward": [], "fresh forward": [], "ext total": [], "fresh total": []}
    facts: dict = {}
    for rep in range(REPS):
        case = tmp / f"extend-{rep}"
        work = case / "work"
        work.mkdir(parents=True)
        base_root, fresh_root = case / "extended", case / "fresh"
        _timed_run(work, _write_cfg(case / "half.yaml", model, base_root, n))
        before = sorted(p.name for p in (base_root / "staging").iterdir())
        # interleaved, each going first in turn
        order = [("ext", base_root), ("fresh", fresh_root)]
        for what, root in order if rep % 2 == 0 else order[::-1]:
            took = _timed_run(work, _write_cfg(case / f"{what}.yaml", model, root, 2 * n))
            (ext_s if what == "ext" else fresh_s).append(took)
        merged = json.loads((base_root / "final/.merged.json").read_text())
        after = sorted(p.name for p in (base_root / "staging").iterdir())
        new = _manifests(base_root, [c for c in after if c not in before])
        fresh_chunks = _manifests(fresh_root, sorted(p.name for p in (fresh_root / "staging").iterdir()))
        for arm, chunks in (("ext", new), ("fresh", fresh_chunks)):
            chunk_times[f"{arm} forward"].append(_chunk_seconds(chunks, "forward_s"))
            chunk_times[f"{arm} total"].append(_chunk_seconds(chunks, "total_s"))
        facts = {"chunks_before": len(before), "chunks_after": len(after), "methods": merged["methods"],
                 "new_tokens": sum(m["tokens"] for m in new), "fresh_tokens": sum(m["tokens"] for m in fresh_chunks)}
        shutil.rmtree(case)
    ext, fresh = statistics.median(ext_s), statistics.median(fresh_s)
    med = {k: statistics.median(v) for k, v in chunk_times.items()}
    note = (f"{n} -> {2 * n} examples: chunks {facts['chunks_before']} -> {facts['chunks_after']}, "
            f"merge {facts['methods']}; tokens computed {facts['new_tokens']:,} vs {facts['fresh_tokens']:,} fresh")
    return [
        {"benchmark": "extend", "case": f"forward of the chunks that ran, extend x2 vs fresh ({note})",
         "a": f"{med['ext forward']:.1f} s", "b": f"{med['fresh forward']:.1f} s",
         "ratio": f"{med['ext forward'] / med['fresh forward']:.3f}", "goal": GOALS["extend"]},
        {"benchmark": "extend", "case": "chunk jobs in all (model load, forward, writing), extend x2 vs fresh",
         "a": f"{med['ext total']:.1f} s", "b": f"{med['fresh total']:.1f} s",
         "ratio": f"{med['ext total'] / med['fresh total']:.3f}", "goal": "report (a model load per chunk job)"},
        {"benchmark": "extend", "case": "whole run (snakemake start, preflight, chunk jobs, merge, card, verify, "
         "report), extend x2 vs fresh", "a": f"{ext:.1f} s", "b": f"{fresh:.1f} s", "ratio": f"{ext / fresh:.3f}",
         "goal": "report (fixed per-run costs do not halve)"},
    ]
