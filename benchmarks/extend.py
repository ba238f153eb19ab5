"""``extend``: a dataset extended to twice its examples vs the same dataset computed fresh.

Both through real ``snakemake`` runs of the whole workflow (chunks, merge, card, verify, push.json, report) on the
tiny benchmark model: a data root of N examples in 4 chunks is extended to 2N (``dataset.max_samples``), against a
fresh run of 2N examples in 4 chunks. The extension runs only the 4 chunks of new examples and appends their rows
to the existing files, so it costs about the new half: the goal is a ratio of at most 0.6 (the fixed part of a
run, Snakemake's start and the stages after the chunks, does not halve).
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


def _tokens(root: Path, chunks: list[str]) -> int:
    return sum(json.loads((root / "staging" / name / "manifest.json").read_text())["tokens"] for name in chunks)


def bench_extend(args, tmp: Path) -> list[dict]:
    from .run import GOALS, build_model

    model = build_model("tiny", tmp / "model-tiny")
    n = EXAMPLES
    ext_s, fresh_s = [], []
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
        facts = {"chunks_before": len(before), "chunks_after": len(after), "methods": merged["methods"],
                 "new_tokens": _tokens(base_root, [c for c in after if c not in before]),
                 "fresh_tokens": _tokens(fresh_root, sorted(p.name for p in (fresh_root / "staging").iterdir()))}
        shutil.rmtree(case)
    ext, fresh = statistics.median(ext_s), statistics.median(fresh_s)
    note = (f"{n} -> {2 * n} examples: chunks {facts['chunks_before']} -> {facts['chunks_after']}, "
            f"merge {facts['methods']}; tokens computed {facts['new_tokens']:,} vs {facts['fresh_tokens']:,} fresh")
    return [{"benchmark": "extend", "case": f"extend x2 vs fresh ({note})", "a": f"{ext:.1f} s",
             "b": f"{fresh:.1f} s", "ratio": f"{ext / fresh:.3f}", "goal": GOALS["extend"]}]
