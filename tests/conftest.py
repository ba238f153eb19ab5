"""Shared fixtures: tiny real-architecture checkpoints, configs in tmp dirs, staged demo chunks, a SLURM cluster.

The helpers these fixtures are built from live in ``tests/support/``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from .support.slurm_cluster import local_slurm, unavailable_reason
from .support.tiny_data import DEMO_CHUNKS, TINY_LLAMA, base_config, stage_chunks

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


@pytest.fixture
def make_config(tmp_path):
    def make(**sections):
        return base_config(tmp_path / "root", **sections)

    return make


@pytest.fixture(scope="session")
def staged_demo_chunks(tmp_path_factory) -> Path:
    """A data root holding only ``staging/`` with the two chunks of ``DEMO_CHUNKS``, staged once per session.

    Read-only for the tests: a test that merges, damages or extends them copies them first (``shutil.copytree``).
    """
    root = tmp_path_factory.mktemp("demo-staged") / "root"
    stage_chunks(root, **DEMO_CHUNKS)
    return root


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node SLURM cluster for one module; skipped where SLURM or its executor plugin is missing.

    QK_SNIFFER_REQUIRE_SLURM=1 (as in CI) turns the skip into a failure.
    """
    reason = unavailable_reason()
    if reason is None and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        reason = "the SLURM executor plugin is not installed (pip install snakemake-executor-plugin-slurm)"
    if reason:
        if os.environ.get("QK_SNIFFER_REQUIRE_SLURM", "").strip() in ("1", "true", "yes"):
            pytest.fail(f"QK_SNIFFER_REQUIRE_SLURM is set but {reason}")
        pytest.skip(reason)
    with local_slurm(tmp_path_factory.mktemp("slurm"), partition="main") as cluster:
        yield cluster
