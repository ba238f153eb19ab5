"""The Snakemake workflow end to end: real ``snakemake`` subprocesses on the tiny models.

One uninterrupted run (module fixture) is the reference; the other tests copy its working
directory (data, Snakemake's metadata and mtimes included) and change one thing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml

from .support.rows import assert_same_rows
from .support.tiny_data import REPO
from .support.workflow_runs import (
    RUN_TIMEOUT,
    SPLIT,
    copy_workdir,
    final_files,
    make_workdir,
    manifests,
    mtimes,
    snakemake,
    snakemake_cmd,
    workflow_env,
)

pytestmark = pytest.mark.slow

# each run: 40 examples of the demo corpus in 3 chunks
WORKDIR_SECTIONS = {"dataset": {"max_samples": 40}, "tokenizer": {"max_length": 64}, "workflow": {"num_chunks": 3}}


def load(final: Path, config: str, split: str, cache: Path):
    return datasets.load_dataset(str(final), config, split=split, cache_dir=str(cache))


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, started from an unrelated working directory with -s and --directory."""
    base = tmp_path_factory.mktemp("reference")
    work = make_workdir(base / "work", WORKDIR_SECTIONS)
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    snakemake(work, cwd=elsewhere)
    assert list(elsewhere.iterdir()) == []  # nothing lands in the directory snakemake was started from
    return work


def test_full_run_loads_with_datasets(reference, tmp_path):
    root = reference / "root"
    final = root / "final"
    files = final_files(root)
    assert len(manifests(root)) == 3
    assert len(files) == 4 * (4 + 2)  # 4 layers x (4 query heads + 2 key heads)
    rows = {name: pq.read_metadata(p).num_rows for name, p in files.items()}
    assert all(n > 0 for n in rows.values())
    cache = tmp_path / "hf-cache"
    expected = {
        "l00h00q": rows["l00h00q"],
        "layer00": sum(n for name, n in rows.items() if name.startswith("l00h")),
        "all": sum(rows.values()),
        "all_k": sum(n for name, n in rows.items() if name.endswith("k")),
    }
    for config, n in expected.items():
        ds = load(final, config, SPLIT, cache)
        assert ds.num_rows == n, config
    ds = load(final, "l00h00q", SPLIT, cache)
    assert set(ds.column_names) >= {"bucket", "example_id", "position", "vector", "sliding_window", "layer", "head",
                                    "kind"}
    pairs = list(zip(ds["example_id"], ds["position"]))
    assert pairs == sorted(set(pairs))  # unique and sorted on (example_id, position)
    assert (root / "push.json").is_file()
    assert sorted(p.name for p in (root / "logs").rglob("*.log")) == [
        "chunk-0.log", "chunk-1.log", "chunk-2.log", "merge_staging.log", "pull_hub.log", "push_hub.log",
        "render_readme.log", "render_report.log", "verify_dataset.log"]
    assert json.loads((root / "verify.json").read_text())["ok"] is True


def test_killed_run_resumes_without_redoing_finished_chunks(reference, tmp_path):
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS)
    root = work / "root"
    env = workflow_env(tmp_path)
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(snakemake_cmd(work), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not manifests(root):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        done = manifests(root)
        # chunks run one at a time (2 threads each, --cores 2): wait until the next one has started,
        # which Snakemake does only after it has recorded the finished one
        while len(list((root / "logs" / "sniff_chunk").glob("*.log"))) <= len(done):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        log.close()
    finished = manifests(root)
    assert 0 < len(finished) < 3, "the kill must land while chunks are still missing"
    assert not (root / "final" / ".merged.json").exists()
    before = mtimes(finished.values())

    snakemake(work, "--unlock")  # a killed run leaves Snakemake's directory lock behind
    res = snakemake(work, "--rerun-incomplete")
    after = manifests(root)
    assert sorted(after) == [0, 1, 2]
    assert mtimes(finished.values()) == before  # finished chunks were not recomputed
    out = res.stdout + res.stderr
    rerun = {int(m) for m in re.findall(r"wildcards: root=[^,\n]+, chunk=(\d+)", out)}
    assert rerun == {0, 1, 2} - set(finished), out  # exactly the unfinished chunks ran again

    assert_same_dataset(root, reference / "root")


def assert_same_dataset(root: Path, ref_root: Path) -> None:
    """Every final file holds the same rows as the reference run's (vectors as close as two processes get)."""
    ref_files = final_files(ref_root)
    got = final_files(root)
    assert sorted(got) == sorted(ref_files)
    for name, path in got.items():
        assert_same_rows(pq.read_table(path), pq.read_table(ref_files[name]), name)


def test_deleted_manifest_named_as_target_reruns_only_that_chunk(reference, tmp_path):
    work = copy_workdir(reference, tmp_path / "work")
    root = work / "root"
    ms = manifests(root)
    others = mtimes([ms[0], ms[2]])
    downstream = mtimes([root / "final" / ".merged.json", root / "final" / "README.md", root / "push.json",
                         *final_files(root).values()])
    old_rows = yaml.safe_load(ms[1].read_text())["rows"]
    ms[1].unlink()
    res = snakemake(work, "root/staging/chunk-1/manifest.json")
    assert ms[1].is_file()
    assert yaml.safe_load(ms[1].read_text())["rows"] == old_rows
    assert mtimes([ms[0], ms[2]]) == others
    assert mtimes(downstream) == downstream  # only the named target was made
    out = res.stdout + res.stderr
    assert "sniff_chunk" in out and "merge_staging" not in out


def test_rerun_changes_nothing(reference, tmp_path):
    work = copy_workdir(reference, tmp_path / "work")
    root = work / "root"
    everything = [p for p in root.rglob("*") if p.is_file()]
    before = mtimes(everything)
    res = snakemake(work)
    assert "Nothing to be done" in res.stdout + res.stderr
    assert mtimes(everything) == before

    # forcing the merge again (and what follows it) finds no new row and rewrites no data file
    data = list(final_files(root).values())
    data_before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in data}
    snakemake(work, "--forcerun", "merge_staging")
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in data} == data_before
    merged = yaml.safe_load((root / "final" / ".merged.json").read_text())
    assert merged["rows_added_total"] == 0
    assert mtimes(manifests(root).values()) == {p: before[p] for p in manifests(root).values()}


def test_larger_max_samples_appends_only_new_rows(reference, tmp_path):
    work = copy_workdir(reference, tmp_path / "work")
    root = work / "root"
    old = {name: pq.read_table(p) for name, p in final_files(root).items()}
    old_max = max(max(t.column("example_id").to_pylist()) for t in old.values())
    old_manifests = mtimes(manifests(root).values())
    cfg = yaml.safe_load((work / "cfg.yaml").read_text())
    cfg["dataset"]["max_samples"] = 60
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    snakemake(work)
    # the recorded chunks keep their ranges and do not run again; one new chunk holds the new examples
    assert {p: t for p, t in mtimes(manifests(root).values()).items() if p in old_manifests} == old_manifests
    new_chunks = [json.loads(p.read_text())["example_range"] for p in manifests(root).values()
                  if p not in old_manifests]
    assert new_chunks and min(r[0] for r in new_chunks) == 40 and max(r[1] for r in new_chunks) == 60
    added = 0
    for name, path in final_files(root).items():
        new = pq.read_table(path)
        ids = new.column("example_id").to_numpy()
        kept = new.filter(ids < 40)
        assert kept.equals(old[name]), name  # every old row kept, byte for byte, and nothing else below 40
        added += new.num_rows - old[name].num_rows
        assert new.num_rows - old[name].num_rows == int((ids >= 40).sum())
    assert added > 0 and old_max < 40
    merged = yaml.safe_load((root / "final" / ".merged.json").read_text())
    assert merged["rows_added_total"] == added
    assert merged["methods"]["rewrite"] == 0 and merged["methods"]["append"] > 0  # old files appended to


def test_two_models_share_one_data_root(tiny_models, tmp_path):
    work = tmp_path / "work"
    common = {"dataset": {"max_samples": 16}, "tokenizer": {"max_length": 48}, "workflow": {"num_chunks": 1}}
    make_workdir(work, WORKDIR_SECTIONS, "a.yaml", output={"split_name": "a"}, capture={"layers": [0, 1]}, **common)
    make_workdir(work, WORKDIR_SECTIONS, "b.yaml", model={"name": str(tiny_models("qwen3"))}, output={"split_name": "b"},
                 capture={"layers": [1, 2]}, **common)
    snakemake(work, config="a.yaml")
    snakemake(work, config="b.yaml")
    final = work / "root" / "final"
    on_disk = {s: set(final_files(work / "root", s)) for s in ("a", "b")}
    assert {n[:3] for n in on_disk["a"]} == {"l00", "l01"} and {n[:3] for n in on_disk["b"]} == {"l01", "l02"}

    configs = front_matter(final / "README.md")["configs"]
    names = {c["config_name"] for c in configs}
    assert on_disk["a"] | on_disk["b"] <= names
    assert {"all", "all_q", "all_k", "layer00", "layer01", "layer02"} <= names
    for entry in configs:
        listed = {item["split"]: [item["path"]] if isinstance(item["path"], str) else item["path"]
                  for item in entry["data_files"]}
        src, template = next(iter(listed.items()))
        for split in ("a", "b"):
            # the globs this config would list for the split: its own, or the other split's moved over
            globs = listed.get(split) or [g.replace(f"data/{src}/", f"data/{split}/") for g in template]
            matches = [m for g in globs for m in final.glob(g)]
            assert bool(matches) == (split in listed), (entry["config_name"], split, listed)
    cache = tmp_path / "hf-cache"
    for split in ("a", "b"):
        total = sum(pq.read_metadata(p).num_rows for p in final_files(work / "root", split).values())
        assert load(final, "all", split, cache).num_rows == total
    assert load(final, "layer01", "b", cache).num_rows > 0


@pytest.mark.parametrize("remote", [False, True], ids=["no remote", "remote_dir"])
def test_report_waits_for_the_push_only_where_the_push_can_change_final(tmp_path, remote):
    """With a remote, a push that finds it moved merges again, so the report comes after the push; with none,
    nothing after the card changes final/ and the report runs beside verify and push."""
    sections = {"output": {"remote_dir": str(tmp_path / "remote")}} if remote else {}
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS, **sections)
    dot = snakemake(work, "--dag").stdout
    node = {label: n for n, label in re.findall(r'^\s*(\d+)\[label = "(\w+)', dot, re.M)}
    edges = set(re.findall(r"^\s*(\d+) -> (\d+)$", dot, re.M))
    assert (node["render_readme"], node["render_report"]) in edges
    assert (node["render_readme"], node["verify_dataset"]) in edges
    assert ((node["push_hub"], node["render_report"]) in edges) == remote, dot


def test_lint_reports_nothing():
    res = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Lints for" not in out and "good condition" in out


def test_cli_run_prints_a_working_load_line(tmp_path):
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS, dataset={"max_samples": 12}, workflow={"num_chunks": 1})
    res = subprocess.run([str(Path(sys.executable).parent / "sniff-qk"), "run", "--config", "cfg.yaml", "--cores", "2"],
                         cwd=work, capture_output=True, text=True, env=workflow_env(tmp_path), timeout=RUN_TIMEOUT,
                         check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    final = (work / "root" / "final").resolve()
    assert f"dataset: {final} (split 'tiny')" in res.stdout
    line = next(ln.strip() for ln in res.stdout.splitlines() if "datasets.load_dataset(" in ln)
    call = line.replace("datasets.load_dataset(", "load(", 1).replace(")", f", cache_dir={str(tmp_path / 'c')!r})")
    ds = eval(call, {"load": datasets.load_dataset})  # noqa: S307 - the line the command printed
    name = line.split(",")[1].strip().strip('"')
    assert ds.num_rows == pq.read_metadata(final / "data" / "tiny" / name / "data.parquet").num_rows > 0
