"""A full disk, for real: the data root on a small filesystem mounted for the test (tmpfs, else a loop-mounted
ext4 image), filled with a file of our own until a few KB are left.

Mounting needs root (CAP_SYS_ADMIN): without it these tests skip, saying why, unless QK_SNIFFER_REQUIRE_MOUNT=1,
which makes them fail instead (CI runs as root and sets it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.chunk.checkpoints import JOURNAL, SEGMENTS, ChunkProgress
from qk_sniffer.layout import DiskFullError, chunk_dir, manifest_path
from qk_sniffer.merge import merge_staging
from qk_sniffer.store import MERGED_NAME

from .support.tiny_data import CORPUS, REPO, base_config

SPLIT = "tiny"
REQUIRE_MOUNT = "QK_SNIFFER_REQUIRE_MOUNT"
VOLATILE = ("merged_at", "merge_s")  # what differs between two merges of the same data


# -- a small filesystem -------------------------------------------------------------------------------------------


def _cannot_mount(reason: str):
    if os.environ.get(REQUIRE_MOUNT) == "1":
        pytest.fail(f"{REQUIRE_MOUNT}=1 but no small filesystem could be mounted: {reason}")
    pytest.skip(f"needs a small filesystem mounted for the test: {reason}")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(list(cmd), 127, "", str(exc))


def _mount(kind: str, where: Path, mib: int) -> str | None:
    """Mount a new ``kind`` filesystem (tmpfs, or ext4 in an image file next to ``where``) of ``mib`` MiB on
    ``where``; None when it worked, else why not."""
    if kind == "tmpfs":
        res = _run("mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0755", "tmpfs", str(where))
    else:
        image = where.with_name(where.name + ".img")
        with open(image, "wb") as fh:
            fh.truncate(mib << 20)
        res = _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image))
        if res.returncode == 0:
            res = _run("mount", "-o", "loop", str(image), str(where))
    said = (res.stderr or res.stdout).strip().splitlines()
    return None if res.returncode == 0 else f"{kind}: {said[0] if said else f'exit status {res.returncode}'}"


def _unmount(where: Path) -> None:
    if _run("umount", str(where)).returncode != 0:
        _run("umount", "-l", str(where))


@pytest.fixture(scope="module")
def mount_kind(tmp_path_factory) -> str:
    """The kind of small filesystem this machine lets the tests mount (tried once); skips (or fails, with
    QK_SNIFFER_REQUIRE_MOUNT=1) before any chunk runs when there is none."""
    if os.geteuid() != 0:
        _cannot_mount("mounting needs root (CAP_SYS_ADMIN); not running as root")
    base = tmp_path_factory.mktemp("mount-probe")
    why = []
    for kind in ("tmpfs", "ext4"):
        where = base / kind
        where.mkdir()
        error = _mount(kind, where, 4)
        if error is None:
            _unmount(where)
            return kind
        why.append(error)
    _cannot_mount("; ".join(why) + " (a container without CAP_SYS_ADMIN?)")


@pytest.fixture
def small_fs(tmp_path, mount_kind):
    """``mount(mib)``: a new filesystem of ``mib`` MiB mounted under tmp_path; unmounted after the test."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        error = _mount(mount_kind, where, mib)
        if error is not None:
            pytest.fail(f"mounting worked once, not now: {error}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        _unmount(where)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(fs: Path, leave: int) -> Path:
    """A file of ours taking all of ``fs``'s free space but ``leave`` bytes (and less than a page)."""
    filler = fs / "filler.bin"
    size = max(0, (_free(fs) - leave) // 4096 * 4096)
    with open(filler, "wb") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, size)
        except OSError:  # no fallocate on this filesystem: written out
            block = b"\0" * (1 << 20)
            left = size
            while left:
                left -= fh.write(block[:min(left, len(block))])
            fh.flush()
            os.fsync(fh.fileno())
    assert _free(fs) <= leave + 4096, f"{fs}: {_free(fs)} bytes still free"
    return filler


def _disk_bytes(root: Path) -> int:
    """Bytes the files under ``root`` take on their filesystem (whole blocks)."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def _files(base: Path) -> dict[str, bytes]:
    """Every file under ``base`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def _paths(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def _temps(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if ".tmp" in p.name)


# -- a chunk --------------------------------------------------------------------------------------------------------

CHUNK = {"dataset": {"max_samples": 12}, "workflow": {"num_chunks": 1}}


def test_chunk_out_of_space_in_its_writer_then_rerun(tmp_path, small_fs):
    """sniff-chunk on a full disk: one line naming the file, no manifest, nothing half-written left; with room made,
    the same command completes."""
    fs = small_fs(16)
    root = fs / "root"
    cfg = base_config(root, **CHUNK)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    filler = _fill(fs, 8 << 10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "qk_sniffer", "sniff-chunk", "--config", str(cfg_path), "--chunk", "0"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    staged = chunk_dir(root, 0)
    assert errors[0].startswith(f"error: No space left on device writing {staged}/"), errors[0]
    assert "run the chunk again" in errors[0]
    print(errors[0])  # shown with pytest -s
    assert not manifest_path(root, 0).exists()
    assert _temps(root) == []
    assert not [p for p in staged.rglob("*") if p.is_file() and p.name != JOURNAL]  # nothing half-written

    filler.unlink()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    man = json.loads(manifest_path(root, 0).read_text())
    assert sum(man["rows"].values()) > 0
    for rel in man["files"].values():
        assert pq.read_metadata(staged / rel).num_rows == man["rows"][Path(rel).parent.name]
    assert _temps(root) == [] and not (staged / SEGMENTS).exists() and not (staged / JOURNAL).exists()


def test_chunk_out_of_space_while_assembling_resumes_from_its_checkpoints(tmp_path, small_fs, monkeypatch, caplog):
    """Room for the checkpoints but not for the chunk's final files: the error names the file, the checkpoints stay,
    the half-assembled files go; with room made the chunk resumes from its checkpoints and gives the same rows."""
    from qk_sniffer.chunk.run import run_chunk

    fs = small_fs(16)
    # the same chunk once with room, keeping its checkpoints, to measure what each step takes on this filesystem
    probe = fs / "probe"
    with monkeypatch.context() as m:
        m.setattr(ChunkProgress, "cleanup", lambda self: None)
        want = run_chunk(base_config(probe, **CHUNK), 0)
    segments = _disk_bytes(chunk_dir(probe, 0) / SEGMENTS) + _disk_bytes(chunk_dir(probe, 0) / JOURNAL)
    assembled = _disk_bytes(chunk_dir(probe, 0) / "data")
    want_rows = {n: pq.read_table(chunk_dir(probe, 0) / rel) for n, rel in want["files"].items()}
    shutil.rmtree(probe)

    root = fs / "root"
    cfg = base_config(root, **CHUNK)
    filler = _fill(fs, segments + assembled // 2)
    with pytest.raises(DiskFullError) as info:
        run_chunk(cfg, 0)
    msg = str(info.value)
    print(msg)  # shown with pytest -s
    assert msg.startswith(f"No space left on device writing {chunk_dir(root, 0)}/data/{SPLIT}/") and "\n" not in msg
    assert "kept its checkpoints" in msg
    assert not manifest_path(root, 0).exists() and (chunk_dir(root, 0) / JOURNAL).is_file()
    assert not (chunk_dir(root, 0) / "data").exists() and _temps(root) == []

    filler.unlink()
    caplog.set_level("INFO", logger="qk_sniffer")
    man = run_chunk(cfg, 0)
    n = want["examples"]
    assert f"chunk 0: resuming after {n} of {n} examples" in caplog.text  # no example runs again
    assert manifest_path(root, 0).is_file() and man["rows"] == want["rows"] and man["files"] == want["files"]
    for name, table in want_rows.items():
        assert pq.read_table(chunk_dir(root, 0) / man["files"][name]).equals(table)
    assert _temps(root) == []


# -- a merge --------------------------------------------------------------------------------------------------------


def _corpus(path: Path, start: int, stop: int) -> Path:
    """Lines ``start:stop`` of the demo corpus with their line number as an integer id: a later part's example ids
    all come after an earlier part's, so merging it appends."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()[start:stop]
    with open(path, "w", encoding="utf-8") as fh:
        for i, line in enumerate(lines, start):
            fh.write(json.dumps({"n": i, "text": json.loads(line)["text"]}) + "\n")
    return path


def _merge_config(root: Path, corpus: Path) -> dict:
    lines = len(corpus.read_text(encoding="utf-8").splitlines())
    return base_config(root, dataset={"data_files": str(corpus), "id_column": "n", "max_samples": lines},
                       workflow={"num_chunks": 1})


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory, mount_kind) -> dict:
    """Examples 0-11, then 12-19, each staged by the real sniff-chunk code as chunk 0 of its own data root."""
    from qk_sniffer.chunk.run import run_chunk

    base = tmp_path_factory.mktemp("full-disk-parts")
    parts = {}
    for name, (a, b) in {"first": (0, 12), "second": (12, 20)}.items():
        corpus = _corpus(base / f"{name}.jsonl", a, b)
        run_chunk(_merge_config(base / name, corpus), 0)
        parts[name] = (base / name / "staging", corpus)
    return parts


def _merge_part(root: Path, part, append: bool) -> dict:
    staging, corpus = part
    shutil.rmtree(root / "staging", ignore_errors=True)
    shutil.copytree(staging, root / "staging")
    return merge_staging(_merge_config(root, corpus), append=append)


def _without_volatile(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in VOLATILE}


@pytest.mark.parametrize("append", [True, False], ids=["append", "rewrite"])
def test_merge_out_of_space_leaves_final_as_it_was(tmp_path, small_fs, two_parts, append):
    """A merge that runs out of space part way leaves every file of final/ (.merged.json too) as it was; with room
    made, the same merge gives the final/ of a merge that never failed."""
    # the reference: both merges where there is room
    ref = tmp_path / "ref"
    _merge_part(ref, two_parts["first"], append)
    want = _merge_part(ref, two_parts["second"], append)
    assert want["methods"] == ({"append": 24, "rewrite": 0} if append else {"append": 0, "rewrite": 24})

    fs = small_fs(16)
    root = fs / "root"
    _merge_part(root, two_parts["first"], append)
    final = root / "final"
    before, before_paths = _files(final), _paths(final)
    shutil.rmtree(root / "staging")
    shutil.copytree(two_parts["second"][0], root / "staging")
    # room for a quarter of what the second merge writes: some configs are written, then one finds the disk full
    # (a merge that replaced each file as soon as it was written got about half of them into final/ here)
    filler = _fill(fs, _disk_bytes(ref / "final") // 4)
    with pytest.raises(DiskFullError) as info:
        merge_staging(_merge_config(root, two_parts["second"][1]), append=append)
    msg = str(info.value)
    print(msg)  # shown with pytest -s
    assert msg.startswith(f"No space left on device writing {final}/") and "\n" not in msg
    assert "final/ was left as it was" in msg and "merge_staging again" in msg
    assert _files(final) == before  # every file, byte for byte
    assert _paths(final) == before_paths  # and nothing more: no temporary file, no new directory

    filler.unlink()
    got = merge_staging(_merge_config(root, two_parts["second"][1]), append=append)
    assert {k: v for k, v in got.items() if k not in VOLATILE} == {k: v for k, v in want.items() if k not in VOLATILE}
    after, ref_files = _files(final), _files(ref / "final")
    assert after.keys() == ref_files.keys()
    assert {k: v for k, v in after.items() if k != MERGED_NAME} == {k: v for k, v in ref_files.items()
                                                                     if k != MERGED_NAME}
    assert _without_volatile(final / MERGED_NAME) == _without_volatile(ref / "final" / MERGED_NAME)
    assert _temps(final) == []
