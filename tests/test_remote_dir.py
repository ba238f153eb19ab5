"""pull/push through a plain-directory remote (DirRemote), with real merges of real staged chunks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from qk_sniffer.card import render_readme
from qk_sniffer.config import ConfigError
from qk_sniffer.front_matter import split_front_matter
from qk_sniffer.merge import merge_staging
from qk_sniffer.remote.base import PushError, Remote, RemoteMovedError
from qk_sniffer.remote.configured import remote_for
from qk_sniffer.remote.directory import DirRemote
from qk_sniffer.remote.local_tree import local_files
from qk_sniffer.remote.sync import pull, read_snapshot
from qk_sniffer.sweep_stages import push_one as push

from .support.tiny_data import DEMO_CHUNKS, base_config

SECTIONS = DEMO_CHUNKS  # what the session fixture staged_demo_chunks staged
SPLIT = "tiny"
KEYS = ["example_id", "position"]


@pytest.fixture
def staged(staged_demo_chunks) -> Path:
    """The session's two staged chunks of ``SECTIONS``; copied by each test."""
    return staged_demo_chunks


def _cfg(root: Path, remote: Path | None, **output) -> dict:
    out = {**output}
    if remote is not None:
        out["remote_dir"] = str(remote)
    return base_config(root, output=out, **SECTIONS)


def _root(tmp_path: Path, name: str, staged: Path, chunks=(0, 1)) -> Path:
    root = tmp_path / name
    for i in chunks:
        shutil.copytree(staged / "staging" / f"chunk-{i}", root / "staging" / f"chunk-{i}")
    return root


def _cycle(cfg: dict) -> dict:
    """What the workflow runs: pull_hub, merge_staging, render_readme, push_hub."""
    pull(cfg)
    merge_staging(cfg)
    render_readme(cfg)
    return push(cfg)


def _tree(base: Path) -> dict[str, str]:
    return {rel: hashlib.sha256(p.read_bytes()).hexdigest() for rel, p in local_files(base).items()}


def _rows(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path)


def test_push_then_pull_into_fresh_root(tmp_path, staged):
    remote_dir = tmp_path / "remote"
    a = _root(tmp_path, "a", staged)
    cfg_a = _cfg(a, remote_dir)
    result = _cycle(cfg_a)
    files = _tree(a / "final")
    assert result["pushed"] and len(result["commits"]) == 1 and result["retries"] == 0
    assert result["files_changed"] == len(files) == 26  # 24 configs, README.md, figures/rows_per_bucket.png
    assert "figures/rows_per_bucket.png" in files
    assert result["bytes"] == sum((a / "final" / rel).stat().st_size for rel in files)
    assert json.loads((a / "push.json").read_text()) == json.loads(json.dumps(result))
    remote = DirRemote(remote_dir)
    assert remote.head() == result["commits"][0] == result["revision"]
    assert _tree(remote_dir) == files and remote.list_files(remote.head()) == files
    snap = read_snapshot(a / "final")
    assert snap["revision"] == remote.head() and snap["files"] == files and snap["remote"] == remote.describe()

    b = tmp_path / "b"
    cfg_b = _cfg(b, remote_dir)
    pulled = pull(cfg_b)
    assert pulled["changed"] and pulled["revision"] == remote.head()
    assert _tree(b / "final") == files
    assert not list(b.glob(".pull-tmp-*"))
    # b has no staged chunks; its merge and render change nothing, so it pushes nothing
    merge_staging(cfg_b)
    render_readme(cfg_b)
    assert _tree(b / "final") == files
    assert push(cfg_b) == {**json.loads((b / "push.json").read_text())}
    assert json.loads((b / "push.json").read_text())["reason"] == "nothing changed"

    # a rerun of the whole cycle in a pushes nothing and pulls nothing
    stamp = (a / "final" / ".snapshot.json").stat().st_mtime_ns
    again = _cycle(cfg_a)
    assert not again["pushed"] and again["reason"] == "nothing changed" and again["commits"] == []
    assert (a / "final" / ".snapshot.json").stat().st_mtime_ns == stamp
    assert remote.head() == result["revision"]


def test_moved_remote_is_pulled_merged_and_retried(tmp_path, staged):
    remote_dir = tmp_path / "remote"
    a = _root(tmp_path, "a", staged, chunks=(0,))
    b = _root(tmp_path, "b", staged, chunks=(1,))
    cfg_a, cfg_b = _cfg(a, remote_dir), _cfg(b, remote_dir)
    pull(cfg_a)
    pull(cfg_b)  # both start from the same (empty) revision
    for cfg in (cfg_a, cfg_b):
        merge_staging(cfg)
        render_readme(cfg)
    first = push(cfg_a)
    assert first["pushed"] and first["retries"] == 0
    second = push(cfg_b)  # based on a stale revision: moved -> pull, merge, render, retry
    assert second["pushed"] and second["retries"] == 1
    remote = DirRemote(remote_dir)
    assert remote.head() == second["revision"] != first["revision"]
    for name, rel in json.loads((staged / "staging" / "chunk-0" / "manifest.json").read_text())["files"].items():
        union = pl.concat([_rows(staged / "staging" / f"chunk-{i}" / rel) for i in (0, 1)]).sort(KEYS)
        got = _rows(remote_dir / "data" / SPLIT / name / "data.parquet")
        assert got.equals(union), name  # every row of both runs, once, sorted
        assert got.select(KEYS).is_unique().all()
    fm, _ = split_front_matter((remote_dir / "README.md").read_text())
    total = sum(pq.read_metadata(p).num_rows for p in (remote_dir / "data").rglob("*.parquet"))
    assert fm["qk_sniffer"]["splits"][SPLIT]["rows_total"] == total
    # a catches up with a plain pull
    pull(cfg_a)
    assert _tree(a / "final") == _tree(remote_dir)


def test_retries_are_bounded(tmp_path, staged):
    remote_dir = tmp_path / "remote"
    a = _root(tmp_path, "a", staged, chunks=(0,))
    b = _root(tmp_path, "b", staged, chunks=(1,))
    cfg_a, cfg_b = _cfg(a, remote_dir), _cfg(b, remote_dir, max_push_retries=0)
    pull(cfg_b)
    merge_staging(cfg_b)
    render_readme(cfg_b)
    _cycle(cfg_a)
    with pytest.raises(PushError) as err:
        push(cfg_b)
    assert "max_push_retries" in str(err.value) and str(remote_dir) in str(err.value)
    assert not (b / "push.json").exists()


def test_remote_deletions_reach_final_and_foreign_files_are_kept(tmp_path, staged):
    remote_dir = tmp_path / "remote"
    remote = DirRemote(remote_dir)
    # someone else published a figure and another model's split before this run
    fig = tmp_path / "plot.txt"
    fig.write_text("a figure")
    other = staged / "staging" / "chunk-0" / "data" / SPLIT / "l00h00q" / "data.parquet"
    remote.commit({"figures/plot.txt": fig, "data/other/l00h00q/data.parquet": other}, None, "by hand")
    a = _root(tmp_path, "a", staged)
    cfg = _cfg(a, remote_dir)
    result = _cycle(cfg)
    assert result["pushed"]
    files = remote.list_files(remote.head())
    assert "figures/plot.txt" in files and "data/other/l00h00q/data.parquet" in files
    assert (remote_dir / "figures" / "plot.txt").read_text() == "a figure"
    assert (a / "final" / "figures" / "plot.txt").read_text() == "a figure"
    fm, _ = split_front_matter((remote_dir / "README.md").read_text())
    l00 = next(e for e in fm["configs"] if e["config_name"] == "l00h00q")
    assert [i["split"] for i in l00["data_files"]] == ["other", SPLIT]

    # a file deleted in the remote disappears locally with the next pull
    gone = "data/tiny/l03h03q/data.parquet"
    remote.delete([gone, "figures/plot.txt"], remote.head(), "drop")
    pulled = pull(cfg)
    assert sorted(pulled["removed"]) == sorted([gone, "figures/plot.txt"])
    assert not (a / "final" / gone).exists() and not (a / "final" / "data" / "tiny" / "l03h03q").exists()
    assert not (a / "final" / "figures" / "plot.txt").exists()
    assert _tree(a / "final") == _tree(remote_dir)
    # the staged chunks still hold its rows: the next merge replays them and the push restores the file
    merge_staging(cfg)
    render_readme(cfg)
    assert push(cfg)["pushed"]
    assert gone in remote.list_files(remote.head())


def test_large_pushes_split_into_guarded_commits(tmp_path, staged):
    remote_dir = tmp_path / "remote"
    a = _root(tmp_path, "a", staged)
    cfg = _cfg(a, remote_dir)
    pull(cfg)
    merge_staging(cfg)
    render_readme(cfg)
    result = push(cfg, max_files=10)
    assert len(result["commits"]) == 3 and result["files_changed"] == 26  # with the card figure
    history = json.loads((remote_dir / DirRemote.RECORD).read_text())["history"]
    assert [h["revision"] for h in history] == result["commits"]
    assert [h["parent"] for h in history] == [None, *result["commits"][:-1]]
    assert [h["files_changed"] for h in history] == [10, 10, 6]
    assert json.loads((remote_dir / DirRemote.RECORD).read_text())["files"] == _tree(a / "final")
    assert push(cfg, max_files=10)["commits"] == []


def test_dir_remote_revisions_and_guards(tmp_path):
    remote = DirRemote(tmp_path / "remote")
    assert isinstance(remote, Remote)
    assert remote.head() is None and remote.list_files(None) == {}
    f = tmp_path / "f.txt"
    f.write_text("one")
    r1 = remote.commit({"a/f.txt": f}, None, "first")
    assert remote.head() == r1 == DirRemote.revision_id({"a/f.txt": hashlib.sha256(b"one").hexdigest()})
    with pytest.raises(RemoteMovedError):
        remote.commit({"a/g.txt": f}, None, "stale")
    assert not (tmp_path / "remote" / "a" / "g.txt").exists()
    f.write_text("two")
    r2 = remote.commit({"a/f.txt": f}, r1, "second")
    assert r2 != r1 and (tmp_path / "remote" / "a" / "f.txt").read_text() == "two"
    with pytest.raises(RemoteMovedError):
        remote.download(tmp_path / "old", r1)  # only the head is kept
    with pytest.raises(ValueError, match="relative"):
        remote.commit({"../escape.txt": f}, r2, "bad")
    dest = tmp_path / "dl"
    dest.mkdir()
    remote.download(dest, r2)
    assert (dest / "a" / "f.txt").read_text() == "two"
    assert not [p for p in (tmp_path / "remote").rglob("*.tmp")]


def test_no_remote_records_empty_snapshot(tmp_path):
    root = tmp_path / "root"
    keep = root / "final" / "data" / SPLIT / "l00h00q" / "data.parquet"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"local")
    cfg = _cfg(root, None)
    assert remote_for(cfg) is None
    snap = pull(cfg)
    assert snap["remote"] is None and snap["revision"] is None
    on_disk = json.loads((root / "final" / ".snapshot.json").read_text())
    assert on_disk["remote"] is None and on_disk["revision"] is None
    assert keep.read_bytes() == b"local"
    result = push(cfg)
    assert result["pushed"] is False and "remote_dir" in result["reason"]
    assert json.loads((root / "push.json").read_text()) == result


def test_remote_selection(tmp_path):
    cfg = _cfg(tmp_path / "root", tmp_path / "remote")
    remote = remote_for(cfg)
    assert isinstance(remote, DirRemote) and remote.describe() == f"dir:{(tmp_path / 'remote').absolute()}"
    both = base_config(tmp_path / "root", output={"remote_dir": str(tmp_path / "r"), "hf_repo_id": "org/x"},
                       **SECTIONS)
    with pytest.raises(ConfigError, match="remote_dir"):
        remote_for(both)


def test_pull_retries_when_a_commit_lands_mid_download(tmp_path, staged, monkeypatch):
    import qk_sniffer.remote.directory as remote_mod

    remote_dir = tmp_path / "remote"
    a = _root(tmp_path, "a", staged)
    _cycle(_cfg(a, remote_dir))
    other = tmp_path / "extra.txt"
    other.write_text("landed during the download")
    real_copy = remote_mod._copy_hashed
    calls = {"n": 0}

    def copy_then_commit(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:  # another writer commits while this pull is copying
            writer = DirRemote(remote_dir)
            writer.commit({"extra.txt": other}, writer.head(), "concurrent")
        return real_copy(src, dst)

    monkeypatch.setattr(remote_mod, "_copy_hashed", copy_then_commit)
    b = tmp_path / "b"
    result = pull(_cfg(b, remote_dir))
    assert result["revision"] == DirRemote(remote_dir).head()
    assert (b / "final" / "extra.txt").read_text() == "landed during the download"
    assert _tree(b / "final") == _tree(remote_dir)
