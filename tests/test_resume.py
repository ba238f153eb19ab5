"""Checkpoints inside a chunk: a killed chunk resumes from its journal and produces the same rows."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.chunk.checkpoints import JOURNAL, SEGMENTS
from qk_sniffer.chunk.run import Capturer, run_chunk
from qk_sniffer.layout import chunk_dir, manifest_path

from .support.rows import assert_same_rows as assert_rows_close
from .support.tiny_data import REPO, base_config
from .test_chunk import staged

EVERY_BATCH = 1e-9  # checkpoint interval that closes a segment after every batch


def chunk_config(root: Path, **sections) -> dict:
    sections.setdefault("inference", {})
    sections["inference"] = {"batch_size": 2, **sections["inference"]}
    return base_config(root, dataset={"max_samples": 30}, **sections)


def reference(tmp_path: Path, **sections) -> dict:
    cfg = chunk_config(tmp_path / "reference", **sections)
    cfg["inference"]["checkpoint_every_s"] = 0
    run_chunk(cfg, 0)
    return staged(tmp_path / "reference")


def assert_same_configs(got: dict, want: dict) -> None:
    """Every column of every config equal, vectors bit for bit (one process, and the resumed batches are the
    same batches)."""
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].equals(want[name]), name


def journal(root: Path) -> dict:
    return json.loads((chunk_dir(root, 0) / JOURNAL).read_text())


def interrupt_after(monkeypatch, n_batches: int) -> None:
    """Make the (n+1)-th batch raise, as if the process died there (the first forward, which sniff-chunk
    computes twice and drops, is not counted)."""
    calls = {"n": -1}
    orig = Capturer.run_batch

    def run_batch(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > n_batches:
            raise KeyboardInterrupt("killed")
        return orig(self, *a, **k)

    monkeypatch.setattr(Capturer, "run_batch", run_batch)


def test_checkpointed_chunk_equals_one_written_in_one_piece(tmp_path):
    cfg = chunk_config(tmp_path / "ck", inference={"checkpoint_every_s": EVERY_BATCH})
    man = run_chunk(cfg, 0)
    assert man["segments"] == 15 and man["resumed"] is None  # 29 examples (one text is empty), 2 per batch, one segment per batch
    assert_same_configs(staged(tmp_path / "ck"), reference(tmp_path))
    out = chunk_dir(tmp_path / "ck", 0)
    assert not (out / SEGMENTS).exists() and not (out / JOURNAL).exists()
    for name, n in man["rows"].items():  # one file per config, its row count as recorded
        assert pq.ParquetFile(out / man["files"][name]).metadata.num_rows == n


def test_interrupted_chunk_resumes_where_it_stopped(tmp_path, monkeypatch, caplog):
    root = tmp_path / "ck"
    cfg = chunk_config(root, inference={"checkpoint_every_s": EVERY_BATCH})
    interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run_chunk(cfg, 0)
    assert not manifest_path(root, 0).exists()
    j = journal(root)
    assert len(j["segments"]) == 6 and sum(b - a for s in j["segments"] for a, b in s["done"]) == 12
    # what a SIGKILL leaves besides: the segment that was cut short
    cut = chunk_dir(root, 0) / SEGMENTS / "seg-0006" / "data/tiny/l00h00q"
    cut.mkdir(parents=True)
    (cut / ".data.parquet.tmp-1").write_bytes(b"half a file")
    stale_journal = chunk_dir(root, 0) / ".progress.json.k1ll3d00.tmp"  # a kill during the journal's own write
    stale_journal.write_text('{"half": ')
    monkeypatch.undo()

    done_batches = []
    orig = Capturer.run_batch

    def counting(self, seqs, ids):
        done_batches.append(len(seqs))
        return orig(self, seqs, ids)

    monkeypatch.setattr(Capturer, "run_batch", counting)
    with caplog.at_level(logging.INFO, logger="qk_sniffer"):
        man = run_chunk(cfg, 0)
    assert "resuming after 12 of 29 examples (6 finished segments)" in caplog.text
    assert done_batches[0] == done_batches[1]  # the first batch twice: its first result is dropped
    assert sum(done_batches[1:]) == 17  # only the examples no finished segment held (29: one text is empty)
    assert man["resumed"] == {"examples": 12, "segments": 6}
    assert man["examples"] == 29 and man["segments"] == 15
    assert_same_configs(staged(root), reference(tmp_path))
    assert not (chunk_dir(root, 0) / SEGMENTS).exists() and not stale_journal.exists()


def test_killed_process_resumes(tmp_path):
    """A real SIGKILL of sniff-chunk mid-way, then the same command again."""
    root = tmp_path / "ck"
    cfg = chunk_config(root, inference={"checkpoint_every_s": EVERY_BATCH})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    # each batch slowed down so that the kill lands between the 3rd checkpoint and the end
    driver = (
        "import sys, time\n"
        "from qk_sniffer.chunk.run import Capturer\n"
        "orig = Capturer.run_batch\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(0.3)\n"
        "    return orig(self, *a, **k)\n"
        "Capturer.run_batch = slow\n"
        "from qk_sniffer.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", driver, "sniff-chunk", "--config", str(cfg_path), "--chunk", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if len(journal(root)["segments"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            if proc.poll() is not None:
                pytest.fail(f"sniff-chunk ended (status {proc.returncode}) before it was killed:\n"
                            f"{proc.stderr.read().decode()[-3000:]}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not manifest_path(root, 0).exists()
    before = journal(root)
    assert 3 <= len(before["segments"]) < 15
    res = subprocess.run([sys.executable, "-m", "qk_sniffer", "sniff-chunk", "--config", str(cfg_path), "--chunk", "0"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"resuming after {2 * len(before['segments'])} of 29 examples" in res.stderr
    man = json.loads(manifest_path(root, 0).read_text())
    assert man["resumed"]["segments"] == len(before["segments"])
    got, want = staged(root), reference(tmp_path)  # computed in other processes than the reference
    assert got.keys() == want.keys()
    for name in want:
        assert_rows_close(got[name], want[name], name)


@pytest.mark.parametrize("damage", ["other_config", "missing_file", "short_file", "bad_journal"])
def test_unusable_journal_starts_the_chunk_over(tmp_path, monkeypatch, caplog, damage):
    root = tmp_path / "ck"
    cfg = chunk_config(root, inference={"checkpoint_every_s": EVERY_BATCH})
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run_chunk(cfg, 0)
    monkeypatch.undo()
    seg0 = chunk_dir(root, 0) / SEGMENTS / "seg-0000" / "data/tiny/l00h00q/data.parquet"
    sections = {"inference": {"checkpoint_every_s": EVERY_BATCH}}
    if damage == "other_config":
        sections["capture"] = {"sampler": {"base_rate": 3.0}}
        cfg = chunk_config(root, **sections)
    elif damage == "missing_file":
        seg0.unlink()
    elif damage == "short_file":  # a readable file with other rows than the journal records
        t = pq.read_table(seg0)
        pq.write_table(t.slice(0, t.num_rows - 1), seg0)
    else:
        (chunk_dir(root, 0) / JOURNAL).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="qk_sniffer"):
        man = run_chunk(cfg, 0)
    assert "cannot be used" in caplog.text and "starting the chunk over" in caplog.text
    assert man["resumed"] is None
    assert_same_configs(staged(root), reference(tmp_path, **sections))


def test_no_checkpoints_when_disabled(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    cfg = chunk_config(root, inference={"checkpoint_every_s": 0})
    interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run_chunk(cfg, 0)
    assert not (chunk_dir(root, 0) / JOURNAL).exists()
    monkeypatch.undo()
    man = run_chunk(cfg, 0)
    assert man["resumed"] is None and man["segments"] == 1


def test_a_finished_chunk_run_again_starts_over(tmp_path):
    """Naming a finished chunk's manifest again (forcerun) redoes it; an old journal is never reused then."""
    root = tmp_path / "ck"
    cfg = chunk_config(root, inference={"checkpoint_every_s": EVERY_BATCH})
    run_chunk(cfg, 0)
    man = run_chunk(cfg, 0)
    assert man["resumed"] is None and man["segments"] == 15
    assert_same_configs(staged(root), reference(tmp_path))

