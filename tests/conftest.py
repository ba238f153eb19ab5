"""Shared fixtures: tiny real-architecture checkpoints, the demo corpus, configs in tmp dirs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from qk_sniffer.config import validate_config

REPO = Path(__file__).resolve().parent.parent
TINY_LLAMA = REPO / "models" / "tiny" / "llama"
CORPUS = REPO / "config" / "demo" / "corpus.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build (once per session) tiny checkpoints of several architectures; returns arch -> path."""
    from qk_sniffer.tiny_checkpoints import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("tiny-models")
    tok = build_tokenizer(root / "tokenizer")
    cache: dict[str, Path] = {"llama": TINY_LLAMA}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_model(arch, root / arch, tokenizer=tok, seed=1)
        return cache[arch]

    return get


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


@pytest.fixture
def make_config(tmp_path):
    def make(**sections):
        return base_config(tmp_path / "root", **sections)

    return make


def merged_sections(*parts: dict) -> dict:
    """Config sections layered left to right, one level deep (``{"dataset": {...}, ...}``)."""
    out: dict = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def stage_chunks(root: Path, **sections) -> dict:
    """Run every chunk of the config (the real sniff-chunk code) into ``root/staging``; return the config."""
    from qk_sniffer.chunk import run_chunk

    cfg = base_config(root, **sections)
    for i in range(cfg["workflow"]["num_chunks"]):
        run_chunk(cfg, i)
    return cfg


def build_final(root: Path, **sections) -> dict:
    """A real final dataset: every chunk staged, merged, and the card rendered; returns the config."""
    from qk_sniffer.merge import merge_staging
    from qk_sniffer.readme import render_readme

    cfg = stage_chunks(root, **sections)
    merge_staging(cfg)
    render_readme(cfg)
    return cfg


# Two separate CPU processes computing the same chunk did not always agree to the last bit: an
# occasional process got the first call of the rotary embedding's cos wrong (~2e-4) in half of the
# batch's rows, which the tiny random Llama's 0.2-std weights amplify to ~2e-3 in the vectors.
# sniff-chunk now computes its first batch twice and drops the first result, after which repeated
# processes gave identical vectors; comparisons across processes keep this margin all the same (keys
# and every other column are compared exactly).
CROSS_PROCESS_RTOL = 2e-3


def assert_same_rows(a, b, what: str = "") -> None:
    """Two Arrow tables or polars frames sorted by key: equal keys and columns, vectors to CROSS_PROCESS_RTOL."""
    import numpy as np

    a, b = (t.to_arrow() if hasattr(t, "to_arrow") else t for t in (a, b))
    for col in a.column_names:
        if col != "vector":
            assert a[col].equals(b[col]), f"{what}: column {col} differs"
            continue
        vx, vy = (np.stack(t[col].to_numpy(zero_copy_only=False)) for t in (a, b))
        scale = np.maximum(np.abs(vy).max(axis=1, keepdims=True), 1e-30)
        err = float((np.abs(vx - vy) / scale).max()) if vx.size else 0.0
        assert vx.shape == vy.shape and err <= CROSS_PROCESS_RTOL, f"{what}: vectors differ (relative {err:.2e})"
