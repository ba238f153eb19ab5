"""The tiny Llama and the demo corpus: validated configs over them, and real data roots built in this process.

``base_config`` is the config every test starts from; ``stage_chunks``, ``merge_and_render`` and ``build_final`` run the real
sniff-chunk, merge and card code on it (no Snakemake), for tests that need real staged chunks or a real final
dataset. They import the model code (torch) when called, so that importing this module, which every test session
does through ``tests/conftest.py``, stays cheap.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from qk_sniffer.config import validate_config

REPO = Path(__file__).resolve().parent.parent.parent
TINY_LLAMA = REPO / "models" / "tiny" / "llama"
CORPUS = REPO / "config" / "demo" / "corpus.jsonl"
# the staged chunks several test files start from (the session fixture ``staged_demo_chunks``): the demo corpus's
# first 12 examples in two chunks (6 + 6), every layer and head
DEMO_CHUNKS = {"workflow": {"num_chunks": 2}, "dataset": {"max_samples": 12}}


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"doc_id": f"doc-{i:05d}", "text": t}) + "\n")
    return path


def base_config(data_root: Path, *, model_dir: Path = TINY_LLAMA, corpus: Path = CORPUS, **sections) -> dict:
    """A validated config over the demo corpus and a tiny model, writing under ``data_root``.

    ``sections`` update the raw config section by section, e.g. ``capture={"layers": [0]}``.
    """
    raw = {
        "dataset": {"path": "json", "data_files": str(corpus), "split": "train", "max_samples": 40},
        "model": {"name": str(model_dir)},
        "tokenizer": {"max_length": 96},
        "inference": {"batch_size": 8},
        "capture": {"min_bucket_size": 8, "sampler": {"type": "log_uniform", "base_rate": 2.0}},
        "output": {"data_root": str(data_root), "split_name": "tiny"},
        "workflow": {"num_chunks": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            merged = copy.deepcopy(raw.get(key, {}))
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            raw[key] = merged
        else:
            raw[key] = value
    return validate_config(raw)


def merged_sections(*parts: dict) -> dict:
    """Config sections layered left to right, one level deep (``{"dataset": {...}, ...}``)."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def stage_chunks(root: Path, **sections) -> dict:
    """Run every chunk of the config (the real sniff-chunk code) into ``root/staging``; return the config."""
    from qk_sniffer.chunk.run import run_chunk

    cfg = base_config(root, **sections)
    for i in range(cfg["workflow"]["num_chunks"]):
        run_chunk(cfg, i)
    return cfg


def merge_and_render(root: Path, **sections) -> dict:
    """The chunks already staged under ``root/staging`` merged into ``final/`` and the card rendered; returns the config."""
    from qk_sniffer.card import render_readme
    from qk_sniffer.merge import merge_staging

    cfg = base_config(root, **sections)
    merge_staging(cfg)
    render_readme(cfg)
    return cfg


def build_final(root: Path, **sections) -> dict:
    """A real final dataset: every chunk staged, merged, and the card rendered; returns the config."""
    stage_chunks(root, **sections)
    return merge_and_render(root, **sections)
