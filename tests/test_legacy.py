"""Datasets of the original qk-sniffer tool: refused by every stage with one line, converted by ``sniff-qk migrate``.

The fixtures are written here with pyarrow in the original tool's schema (bucket, example_id as int32, position,
vector as a list of float32, sliding_window as its writer left it: int64, or all-null of Arrow's null type;
no layer/head/kind), unsorted and with duplicate keys, in both of its layouts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.chunk.writer import row_schema
from qk_sniffer.cli import main
from qk_sniffer.front_matter import read_front_matter
from qk_sniffer.layout import data_file
from qk_sniffer.legacy import ORIGINAL_SAMPLING
from qk_sniffer.migrate import migrate
from qk_sniffer.parquet import write_parquet_atomic
from qk_sniffer.verify import verify

from .support.fakehub import fake_hub_fixture  # noqa: F401  (the fixture fake_hub)
from .support.tiny_data import base_config

KEYS = ["example_id", "position"]
D = 16  # the tiny Llama's head size, so captures of it can be appended to a migrated split


@pytest.fixture(autouse=True)
def _no_stale_log_handler():
    """``main`` points logging at the stderr pytest captures for that test; drop it afterwards."""
    yield
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)


def original_table(seed: int, n: int = 40, window=None, fixed: bool = False, token: bool = False) -> pa.Table:
    """Rows as the original tool wrote them: unsorted, with a repeated key (same vector) and a conflicting one."""
    rng = np.random.default_rng(seed)
    flat = rng.choice(6 * 300, n, replace=False)  # distinct keys, in no order
    ex, pos = (flat // 300).astype(np.int32), (flat % 300).astype(np.int32)
    ex[1], pos[1] = ex[0], pos[0]  # the same key twice, the same vector
    ex[3], pos[3] = ex[2], pos[2]  # the same key twice, another vector
    vec = rng.standard_normal((n, D)).astype(np.float32)
    vec[1] = vec[0]
    values = pa.array(vec.ravel())
    vector = pa.FixedSizeListArray.from_arrays(values, D) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, n * D + 1, D, dtype=np.int32)), values)
    data = {"bucket": pa.array(np.maximum(7, np.floor(np.log2(pos + 1))).astype(np.int32)),
            "example_id": pa.array(ex), "position": pa.array(pos), "vector": vector,
            "sliding_window": pa.array([window] * n)}
    if token:
        data["token_str"] = pa.array([f"t{i}" for i in range(n)], pa.string())
    return pa.table(data)


def write_original(base: Path, layout: str, configs=("l00h00q", "l00h00k", "l01h01q"), splits=("model_a",),
                   **kw) -> dict[str, pa.Table]:
    """The original tool's dataset under ``base``; returns relative path -> table written."""
    out = {}
    for si, split in enumerate(splits):
        for ci, name in enumerate(configs):
            rel = f"{name}/data.parquet" if layout == "branch" else f"data/{split}/{name}/data.parquet"
            table = original_table(100 * si + ci, window=4096 if name.startswith("l01") else None, **kw)
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, base / rel, compression="zstd")
            out[rel] = table
    if layout == "readme":
        models = [{"name": s.replace("_", "/", 1), "url": ""} for s in splits]
        (base / "README.md").write_text("---\n" + yaml.safe_dump({"configs": [], "models": models}) + "---\n# old\n")
        (base / "data" / "_saver_state.json").write_text(json.dumps({"model_metadata": {
            m["name"]: {"source_dataset": "some/corpus", "dataset_split": "train", "sanitized_split": s}
            for m, s in zip(models, splits)}}))
    return out


def expected_rows(table: pa.Table) -> pa.Table:
    """Independently: the first row of each key in file order, sorted by key."""
    seen, keep = set(), []
    for i, key in enumerate(zip(table["example_id"].to_pylist(), table["position"].to_pylist())):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return table.take(keep).sort_by([(k, "ascending") for k in KEYS])


def tree_state(base: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(base).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(base.rglob("*")) if p.is_file()} if base.exists() else {}


def cfg_file(tmp_path: Path, root: Path, **sections) -> tuple[dict, Path]:
    cfg = base_config(root, **sections)
    path = tmp_path / f"cfg-{root.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def one_error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error")]  # the rest: log lines, a download's progress
    assert len(errors) == 1 and not any("Traceback" in line for line in err), "\n".join(err)
    return errors[0]


# -- migrate ------------------------------------------------------------------------------------


def test_migrate_readme_layout(tmp_path, capsys):
    import datasets

    src = tmp_path / "original"
    written = write_original(src, "readme", splits=("model_a", "model_b"))
    source_before = tree_state(src)
    root = tmp_path / "root"
    cfg, path = cfg_file(tmp_path, root, output={"split_name": "model_a"})
    assert main(["migrate", str(src), "--config", str(path)]) == 0
    assert "migrated" in capsys.readouterr().out
    final = root / "final"
    for rel, table in written.items():
        _, split, name, _ = rel.split("/")
        got = pq.read_table(data_file(final, split, name))
        assert got.schema.equals(row_schema(D, "float32", False))
        want = expected_rows(table)
        assert got.num_rows == want.num_rows == table.num_rows - 2
        for col in KEYS + ["bucket"]:
            assert got[col].to_pylist() == want[col].to_pylist(), (rel, col)
        assert np.array_equal(np.stack(got["vector"].to_numpy(zero_copy_only=False)),
                              np.stack(want["vector"].to_numpy(zero_copy_only=False)))
        assert set(got["layer"].to_pylist()) == {int(name[1:3])} and set(got["kind"].to_pylist()) == {name[-1]}
        assert set(got["head"].to_pylist()) == {int(name[4:6])}
        assert set(got["sliding_window"].to_pylist()) == {4096 if name.startswith("l01") else None}
        # written by the project's own writer: rewriting it with write_parquet_atomic gives the same bytes
        again = tmp_path / "again" / rel
        write_parquet_atomic(got.cast(row_schema(D, "float32", False)), again)
        assert again.read_bytes() == data_file(final, split, name).read_bytes()
    fm, _ = read_front_matter(final / "README.md")
    meta = fm["qk_sniffer"]["splits"]["model_b"]
    assert meta["sampling"] == ORIGINAL_SAMPLING and meta["model"]["name"] == "model/b"
    assert meta["migrated"]["duplicates_dropped"] == 6 and meta["migrated"]["conflicting_duplicates"] == 3
    assert meta["dataset"]["path"] == "some/corpus" and meta["rows_total"] == 3 * 38
    assert sum(r["q"] + r["k"] for r in meta["rows_per_bucket"]) == 3 * 38
    assert fm["qk_sniffer"]["splits"]["model_a"]["sampling"] == ORIGINAL_SAMPLING
    report = verify(root)
    assert report.ok, report.format()
    assert any("migrated from the original qk-sniffer tool" in w for w in report.warnings)
    loaded = datasets.load_dataset(str(final), "l00h00q", split="model_b")
    assert sorted(zip(loaded["example_id"], loaded["position"])) == \
        sorted(zip(*(expected_rows(written["data/model_b/l00h00q/data.parquet"])[k].to_pylist() for k in KEYS)))
    assert tree_state(src) == source_before

    # idempotent: a second run changes nothing at all (bytes and mtimes)
    before = tree_state(root)
    assert main(["migrate", str(src), "--config", str(path)]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert tree_state(root) == before


def test_branch_layout_and_appending_captures_needs_allow_mixed_sampling(tmp_path):
    import datasets

    from qk_sniffer.card import render_readme
    from qk_sniffer.chunk.run import run_chunk
    from qk_sniffer.merge import MergeError, merge_staging

    src = tmp_path / "branch"
    written = write_original(src, "branch", configs=("l00h00q", "l00h00k"), fixed=True, token=False)
    root = tmp_path / "root"
    sections = {"capture": {"layers": [0], "heads": [0]}, "dataset": {"max_samples": 4}}
    cfg = base_config(root, **sections)
    res = migrate(cfg, src)
    assert res["changed"] and res["splits"] == {"tiny": res["splits"]["tiny"]} and res["configs"] == 2
    run_chunk(cfg, 0)
    final = root / "final"
    before = tree_state(final)
    with pytest.raises(MergeError, match=r"type: recorded 'original_tool'.*allow_mixed_sampling"):
        merge_staging(cfg)
    assert tree_state(final) == before
    mixed = base_config(root, **sections, output={"allow_mixed_sampling": True})
    merge_staging(mixed)
    render_readme(mixed)
    meta = read_front_matter(final / "README.md")[0]["qk_sniffer"]["splits"]["tiny"]
    assert meta["sampling"]["type"] == "log_uniform" and meta["previous_sampling"] == [ORIGINAL_SAMPLING]
    report = verify(root)
    assert report.ok, report.format()
    got = pq.read_table(data_file(final, "tiny", "l00h00q"))
    old = expected_rows(written["l00h00q/data.parquet"])
    keys = set(zip(got["example_id"].to_pylist(), got["position"].to_pylist()))
    assert set(zip(*(old[k].to_pylist() for k in KEYS))) <= keys and len(keys) > old.num_rows
    assert datasets.load_dataset(str(final), "l00h00q", split="tiny").num_rows == got.num_rows


def test_a_killed_migration_is_completed_by_running_it_again(tmp_path, monkeypatch):
    import qk_sniffer.migrate.install as mig

    src = tmp_path / "original"
    write_original(src, "readme")
    clean = tmp_path / "clean"
    migrate(base_config(clean), src)
    root = tmp_path / "root"
    cfg = base_config(root)
    real, calls = os.replace, []

    def dying_replace(a, b):
        if Path(b).is_relative_to(root / "final" / "data"):
            calls.append(b)
            if len(calls) == 2:
                raise KeyboardInterrupt  # killed between two renames into final/
        return real(a, b)

    monkeypatch.setattr(mig.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        migrate(cfg, src)
    monkeypatch.setattr(mig.os, "replace", real)
    assert json.loads((root / "migrate.json").read_text())["state"] == "moving"
    # meanwhile the card already records the split's sampling, so a merge would not mix samplings
    assert read_front_matter(root / "final" / "README.md")[0]["qk_sniffer"]["splits"]["model_a"]["sampling"] == \
        ORIGINAL_SAMPLING
    assert migrate(cfg, src)["changed"]
    assert json.loads((root / "migrate.json").read_text())["state"] == "done"
    ours, theirs = tree_state(root / "final" / "data"), tree_state(clean / "final" / "data")
    assert {k: v[0] for k, v in ours.items()} == {k: v[0] for k, v in theirs.items()}
    assert not list(root.glob(".migrate-*"))


def test_token_strings_of_some_files_become_a_column_of_every_file_of_the_split(tmp_path):
    src = tmp_path / "original"
    with_tokens = write_original(src, "readme", configs=("l00h00q",), token=True)
    write_original(src, "readme", configs=("l00h00k",))
    root = tmp_path / "root"
    migrate(base_config(root), src)
    q = pq.read_table(data_file(root / "final", "model_a", "l00h00q"))
    k = pq.read_table(data_file(root / "final", "model_a", "l00h00k"))
    assert q.schema.equals(row_schema(D, "float32", True)) and k.schema.equals(row_schema(D, "float32", True))
    assert q["token_str"].to_pylist() == expected_rows(with_tokens["data/model_a/l00h00q/data.parquet"])["token_str"] \
        .to_pylist()
    assert k["token_str"].null_count == k.num_rows
    assert verify(root).ok


def _not_a_dir(src: Path, root: Path) -> Path:
    return src / "missing"


def _empty(src: Path, root: Path) -> Path:
    src.mkdir(parents=True)
    return src


def _both_layouts(src: Path, root: Path) -> Path:
    write_original(src, "readme")
    write_original(src, "branch", configs=("l02h00q",))
    return src


def _already_this_format(src: Path, root: Path) -> Path:
    write_original(src, "readme")
    p = src / "data/model_a/l00h00k/data.parquet"
    t = pq.read_table(p)
    n = t.num_rows
    t = t.append_column("layer", pa.array([0] * n, pa.int16())).append_column("head", pa.array([0] * n, pa.int16()))
    pq.write_table(t.append_column("kind", pa.array(["k"] * n)), p)
    return src


def _unreadable(src: Path, root: Path) -> Path:
    write_original(src, "readme")
    p = src / "data/model_a/l01h01q/data.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return src


def _missing_column(src: Path, root: Path) -> Path:
    write_original(src, "branch")
    p = src / "l00h00k/data.parquet"
    pq.write_table(pq.read_table(p).drop_columns(["position"]), p)
    return src


def _vector_lengths_differ(src: Path, root: Path) -> Path:
    write_original(src, "branch")
    p = src / "l01h01q/data.parquet"
    t = pq.read_table(p)
    vec = t["vector"].to_pylist()
    vec[5] = vec[5][:-1]
    pq.write_table(t.set_column(3, "vector", pa.array(vec, pa.list_(pa.float32()))), p)
    return src


def _null_vector(src: Path, root: Path) -> Path:
    write_original(src, "branch")
    p = src / "l01h01q/data.parquet"
    t = pq.read_table(p)
    vec = t["vector"].to_pylist()
    vec[7] = None
    pq.write_table(t.set_column(3, "vector", pa.array(vec, pa.list_(pa.float32()))), p)
    return src


def _negative_position(src: Path, root: Path) -> Path:
    write_original(src, "branch")
    p = src / "l00h00q/data.parquet"
    t = pq.read_table(p)
    pos = t["position"].to_pylist()
    pos[9] = -1
    pq.write_table(t.set_column(2, "position", pa.array(pos, pa.int32())), p)
    return src


def _split_exists(src: Path, root: Path) -> Path:
    other = src.parent / "other"
    write_original(other, "branch", configs=("l03h00q",))
    migrate(base_config(root), other)  # split "tiny" now holds another dataset
    write_original(src, "branch")
    return src


@pytest.mark.parametrize("damage,says", [
    (_not_a_dir, "is not a directory"),
    (_empty, "holds no dataset of the original qk-sniffer tool"),
    (_both_layouts, "holds both of the original tool's layouts"),
    (_already_this_format, "already has this project's layer/head/kind columns"),
    (_unreadable, "is not readable Parquet"),
    (_missing_column, "lacks the column(s) position"),
    (_vector_lengths_differ, "vectors of different lengths"),
    (_null_vector, "null vector(s)"),
    (_negative_position, "negative positions"),
    (_split_exists, "split 'tiny' already exists"),
])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path, capsys, damage, says):
    root = tmp_path / "root"
    src = damage(tmp_path / "src", root)
    _, path = cfg_file(tmp_path, root)
    before, source_before = tree_state(root), tree_state(src)
    line = one_error_line(capsys, ["migrate", str(src), "--config", str(path)])
    assert says in line and "nothing was migrated" in line, line
    assert tree_state(root) == before and tree_state(src) == source_before
    assert not list(root.glob(".migrate-*")) if root.exists() else True


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data root", "final"])
def test_every_stage_refuses_a_local_original_dataset_with_one_line(tmp_path, capsys, where):
    root = tmp_path / "root"
    base = root if where == "data root" else root / "final"
    write_original(base, "readme")
    _, path = cfg_file(tmp_path, root)
    before = tree_state(root)
    rel = "data/model_a/l00h00k/data.parquet"
    for argv in (["sniff-chunk", "--config", str(path), "--chunk", "0"], ["pull", "--config", str(path)],
                 ["merge", "--config", str(path)], ["render-readme", "--config", str(path)],
                 ["push", "--config", str(path)]):
        line = one_error_line(capsys, argv)
        assert f"{base} holds a dataset of the original qk-sniffer tool ({rel}: the original tool's README layout" \
            in line and "sniff-qk migrate" in line, (argv, line)
    assert tree_state(root) == before
    report = verify(root)
    assert report.problems == [line[len("error: "):]]
    # the branch layout, found by its paths
    (base / "data").rename(tmp_path / "moved")
    write_original(base, "branch", configs=("l00h00q",))
    line = one_error_line(capsys, ["merge", "--config", str(path)])
    assert "(l00h00q/data.parquet: the original tool's per-model-branch layout" in line


def test_a_remote_dir_holding_the_original_dataset_is_refused(tmp_path, capsys):
    remote = tmp_path / "shared"
    write_original(remote, "branch")
    root = tmp_path / "root"
    _, path = cfg_file(tmp_path, root, output={"remote_dir": str(remote)})
    before = tree_state(remote)
    for stage in ("pull", "push"):
        line = one_error_line(capsys, [stage, "--config", str(path)])
        assert f"dir:{remote} holds a dataset of the original qk-sniffer tool (l00h00k/data.parquet" in line
        assert "Nothing was pulled or pushed" in line
    assert tree_state(remote) == before


# -- the Hub (real huggingface_hub client, fake Hub) ---------------------------------------------

REPO = "tester/sniffed"


def original_files(tmp_path: Path, layout: str, **kw) -> dict[str, bytes]:
    base = tmp_path / f"files-{layout}"
    write_original(base, layout, **kw)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def downloads(hub) -> int:
    return len(hub.requests_matching("GET", r"/resolve/"))


def test_pull_refuses_an_original_branch_and_migrate_reads_it(fake_hub, tmp_path, capsys):
    import datasets

    fake_hub.create_repo(REPO)
    fake_hub.set_branch(REPO, "llama", fake_hub.head(REPO))
    fake_hub.commit(REPO, original_files(tmp_path, "branch"), branch="llama", message="the original tool's push")
    root = tmp_path / "root"
    cfg, path = cfg_file(tmp_path, root, output={"hf_repo_id": REPO, "hf_branch": "llama"})
    line = one_error_line(capsys, ["pull", "--config", str(path)])
    assert line == (f"error: hf dataset {REPO}@llama at {fake_hub.url} holds a dataset of the original qk-sniffer tool "
                    "(l00h00k/data.parquet: the original tool's per-model-branch layout lLLhHH{q|k}/data.parquet at "
                    "the top); it is not mixed with this project's format. Nothing was pulled or pushed. Use another "
                    "branch or repo (output.hf_branch, output.hf_repo_id; output.remote_dir), or convert it: sniff-qk "
                    "migrate --config CONFIG reads it from this remote into the data root, then publish the result to "
                    "another branch or repo")
    assert downloads(fake_hub) == 0  # found from the listing: nothing was downloaded
    assert not (root / "final").exists() or not any((root / "final").rglob("*"))

    assert main(["migrate", "--config", str(path)]) == 0
    n = downloads(fake_hub)
    assert main(["migrate", "--config", str(path)]) == 0
    assert "nothing changed" in capsys.readouterr().out and downloads(fake_hub) == n  # not even downloaded again
    # the way out: publish the converted split to another branch
    from qk_sniffer.card import render_readme
    from qk_sniffer.remote.sync import pull
    from qk_sniffer.sweep_stages import push_one as push

    other = base_config(root, output={"hf_repo_id": REPO, "hf_branch": "qk"})
    pull(other)
    render_readme(other)
    assert verify(root, cfg=other).ok
    assert push(other)["pushed"]
    loaded = datasets.load_dataset(REPO, "l00h00q", split="tiny", revision="qk")
    want = pq.read_table(data_file(root / "final", "tiny", "l00h00q"))
    assert loaded["example_id"] == want["example_id"].to_pylist() and loaded["layer"] == [0] * want.num_rows
    assert sorted(fake_hub.files(REPO, "llama")) == sorted([*original_files(tmp_path, "branch"), ".gitattributes"])


def test_pull_refuses_the_readme_layout_after_reading_its_schema(fake_hub, tmp_path, capsys):
    repo = "tester/old-readme-layout"
    fake_hub.create_repo(repo)
    fake_hub.commit(repo, original_files(tmp_path, "readme", splits=("tiny",)))
    root = tmp_path / "root"
    cfg, path = cfg_file(tmp_path, root, output={"hf_repo_id": repo})
    (root / "final").mkdir(parents=True)
    (root / "final" / "notes.txt").write_text("kept")
    before = tree_state(root)
    line = one_error_line(capsys, ["pull", "--config", str(path)])
    assert f"hf dataset {repo}@main at {fake_hub.url} holds a dataset of the original qk-sniffer tool " \
           "(data/tiny/l00h00k/data.parquet: the original tool's README layout" in line
    assert tree_state(root) == before and not list(root.glob(".pull-tmp-*"))


@pytest.mark.slow
def test_run_stops_in_the_preflight_with_the_one_line(fake_hub, tmp_path):
    import subprocess
    import sys

    fake_hub.create_repo(REPO)
    fake_hub.set_branch(REPO, "llama", fake_hub.head(REPO))
    fake_hub.commit(REPO, original_files(tmp_path, "branch"), branch="llama")
    work = tmp_path / "work"
    work.mkdir()
    cfg = base_config(Path("root"), dataset={"max_samples": 4}, capture={"layers": [0]},
                      output={"hf_repo_id": REPO, "hf_branch": "llama"})
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "QK_SNIFFER_GPUS": "", "QK_SNIFFER_GPU_LOCK_DIR": str(tmp_path / "locks")}
    res = subprocess.run([str(Path(sys.executable).parent / "sniff-qk"), "run", "--config", "cfg.yaml", "--cores", "2"],
                         cwd=work, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    lines = [ln for ln in out.splitlines() if "holds a dataset of the original qk-sniffer tool" in ln]
    assert lines and lines[0].startswith("preflight: "), out[-3000:]
    # refused before any job: no chunk ran, nothing was pulled or pushed
    assert not (work / "root" / "staging").exists() and not (work / "root" / "push.json").exists()
    assert not (work / "root" / "logs" / "pull_hub.log").exists()
