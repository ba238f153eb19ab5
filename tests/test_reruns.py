"""What reruns is decided by the data root: real ``snakemake`` subprocesses on the tiny Llama.

A chunk's manifest records its fingerprint and example range; the preflight compares them with the config and
hands the decision to Snakemake through the chunk's plan file, so the same thing happens from any working
directory, without ``.snakemake/``, and after the data root was copied or moved.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from .support.tiny_data import base_config
from .support.workflow_runs import copy_workdir, final_files, manifests, mtimes, snakemake, write_yaml

pytestmark = pytest.mark.slow


def write_config(path: Path, root: Path, max_samples: int, **sections) -> Path:
    sections.setdefault("tokenizer", {"max_length": 48})
    sections.setdefault("workflow", {"num_chunks": 2})
    return write_yaml(path, base_config(root, dataset={"max_samples": max_samples}, **sections))


def run(workdir: Path, config: Path, *extra: str):
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, workdir / "cfg.yaml")
    res = snakemake(workdir, *extra)
    return res.stdout + res.stderr


def ranges(root: Path) -> dict[int, list]:
    return {k: json.loads(p.read_text())["example_range"] for k, p in manifests(root).items()}


def _ids(files) -> set[int]:
    return {i for p in files for i in pq.read_table(p, columns=["example_id"]).column("example_id").to_pylist()}


def example_ids(root: Path) -> set[int]:
    return _ids(final_files(root).values())


def staged_ids(root: Path, stop: int) -> set[int]:
    """The examples below ``stop`` that some chunk sampled a token of (not every example has one)."""
    return {i for i in _ids(root.glob("staging/chunk-*/data/*/*/data.parquet")) if i < stop}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path]:
    """40 examples in 2 chunks into an absolute data root, run from directory A."""
    base = tmp_path_factory.mktemp("reruns")
    root = base / "data"
    cfg = write_config(base / "cfg-40.yaml", root, 40)
    run(base / "A", cfg)
    assert ranges(root) == {0: [0, 20], 1: [20, 40]}
    return base, root


def clone(base: Path, dst: Path) -> tuple[Path, Path]:
    return copy_workdir(base, dst), dst / "data"


def test_a_larger_max_samples_from_another_directory_runs_only_the_new_examples(first_run, tmp_path):
    base, root = clone(first_run[0], tmp_path / "x")
    old = mtimes(manifests(root).values())
    cfg = write_config(base / "cfg-80.yaml", root, 80)
    out = run(base / "B", cfg)  # another working directory: no Snakemake records of the first run
    assert "Nothing to be done" not in out
    assert ranges(root) == {0: [0, 20], 1: [20, 40], 2: [40, 60], 3: [60, 80]}
    assert {p: t for p, t in mtimes(manifests(root).values()).items() if p in old} == old  # chunks 0, 1 untouched
    assert "chunk 2 [40, 60) runs: it has not run yet" in out and "chunk 0 [" not in out
    assert example_ids(root) == staged_ids(root, 80) and max(example_ids(root)) >= 60
    merged = json.loads((root / "final" / ".merged.json").read_text())
    assert merged["methods"]["rewrite"] == 0 and merged["methods"]["append"] > 0  # the old files appended to

    # and again from a third directory: nothing to do
    assert "Nothing to be done" in run(base / "C", cfg)


def test_without_snakemake_records_only_changed_chunks_rerun(first_run, tmp_path):
    base, root = clone(first_run[0], tmp_path / "x")
    shutil.rmtree(base / "A" / ".snakemake")
    cfg40 = base / "cfg-40.yaml"
    everything = [p for p in root.rglob("*") if p.is_file() and ".qk-sniffer" not in p.parts]
    before = mtimes(everything)
    assert "Nothing to be done" in run(base / "A", cfg40)
    assert mtimes(everything) == before

    # 30 examples: chunk 1's range shrinks to [20, 30); chunk 0 stays
    published = example_ids(root)
    assert max(published) >= 30
    cfg30 = write_config(base / "cfg-30.yaml", root, 30)
    m = manifests(root)
    out = run(base / "A", cfg30)
    assert "chunk 1 [20, 30) runs: its examples change from [20, 40) to [20, 30)" in out
    assert m[0].stat().st_mtime_ns == before[m[0]] and m[1].stat().st_mtime_ns != before[m[1]]
    assert ranges(root) == {0: [0, 20], 1: [20, 30]}
    assert example_ids(root) == published  # published rows are never removed

    # a setting that changes rows: every chunk reruns, and the line says which setting
    shutil.rmtree(base / "A" / ".snakemake")
    cfg = write_config(base / "cfg-rate.yaml", root, 30, capture={"sampler": {"base_rate": 0.5}})
    out = run(base / "A", cfg, "--dry-run")
    assert "chunk 0 [0, 20) runs: the config changed: capture.sampler.base_rate" in out
    assert "chunk 1 [20, 30) runs: the config changed" in out


def test_a_copied_data_root_is_extended_where_it_now_lives(first_run, tmp_path):
    base, _ = first_run
    moved = tmp_path / "elsewhere" / "data"
    shutil.copytree(base / "data", moved, symlinks=True)
    old_final = {p: p.read_bytes() for p in (base / "data" / "final").rglob("*") if p.is_file()}
    kept = mtimes(manifests(moved).values())
    cfg = write_config(tmp_path / "cfg.yaml", moved, 60)
    out = run(tmp_path / "work", cfg)
    assert "chunk 2 [40, 60) runs: it has not run yet" in out
    assert ranges(moved) == {0: [0, 20], 1: [20, 40], 2: [40, 60]}
    assert {p: t for p, t in mtimes(manifests(moved).values()).items() if p in kept} == kept
    assert example_ids(moved) == staged_ids(moved, 60) and max(example_ids(moved)) >= 40
    assert {p: p.read_bytes() for p in (base / "data" / "final").rglob("*") if p.is_file()} == old_final
