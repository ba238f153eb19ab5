"""The typed records of a data root (qk_sniffer.records): chunk manifests and final/.merged.json, as real
sniff-chunk and merge runs write them, as earlier versions wrote them, and damaged."""

from __future__ import annotations

import json
import shutil

import pytest

from qk_sniffer.chunk.plan import decide, manifest_fingerprint_matches
from qk_sniffer.config import legacy_chunk_fingerprint
from qk_sniffer.merge import MergeError, merge_staging
from qk_sniffer.records import (
    MANIFEST_VERSION,
    MERGE_RECORD_VERSION,
    ChunkManifest,
    MergeRecord,
    RecordError,
    read_manifest,
    read_merge_record,
)
from qk_sniffer.store import StoreError, merged_record, scan_chunks
from qk_sniffer.verify import verify

from .support.tiny_data import DEMO_CHUNKS, base_config


@pytest.fixture
def root(tmp_path, staged_demo_chunks):
    shutil.copytree(staged_demo_chunks, tmp_path / "root")
    return tmp_path / "root"


def _manifest_file(root, chunk=0):
    return root / "staging" / f"chunk-{chunk}" / "manifest.json"


def test_a_written_manifest_reads_back_as_the_same_record(root):
    raw = json.loads(_manifest_file(root).read_text())
    assert raw["schema_version"] == MANIFEST_VERSION and "summaries" not in raw and "num_chunks" not in raw
    man = read_manifest(_manifest_file(root))
    assert man.to_json() == raw
    assert man.chunk == 0 and man.example_range == [0, 6] and man.total_rows == sum(raw["rows"].values()) > 0
    assert set(man.files) <= set(man.rows) and man.model["num_layers"] == 4
    assert [m.chunk for _, m in scan_chunks(root)[0]] == [0, 1]


def test_a_version_1_manifest_reads_with_defaults_and_keeps_matching_its_config(root):
    """A manifest of an earlier qk-sniffer: no schema_version, per-file summaries, num_chunks, and none of the
    fields added since. It reads, its summaries are dropped, and its old fingerprint formula still matches."""
    cfg = base_config(root, **DEMO_CHUNKS)
    raw = json.loads(_manifest_file(root).read_text())
    for key in ("schema_version", "chunk_size", "computed_tokens", "fingerprint_inputs", "skipped_invalid", "resumed"):
        raw.pop(key)
    raw["summaries"] = {name: {"rows": n} for name, n in raw["rows"].items()}
    raw["num_chunks"] = 2
    raw["config_fingerprint"] = legacy_chunk_fingerprint(cfg, cfg["dataset"]["max_samples"], 2)
    raw["slurm_job_id"] = None
    _manifest_file(root).write_text(json.dumps(raw))
    man = read_manifest(_manifest_file(root))
    assert man.schema_version == MANIFEST_VERSION and not hasattr(man, "summaries")
    assert (man.chunk_size, man.computed_tokens, man.fingerprint_inputs, man.num_chunks) == (None, 0, None, 2)
    assert "summaries" not in man.to_json()
    assert manifest_fingerprint_matches(man, cfg)
    assert [d.runs for d in decide(cfg, root, 12).decisions] == [False, False]  # nothing reruns after the upgrade
    assert merge_staging(cfg)["rows_added_total"] == sum(m.total_rows for _, m in scan_chunks(root)[0])


@pytest.mark.parametrize("edit, what", [
    (lambda m: m.update(rows=[1, 2]), "records rows as list [1, 2], not a mapping"),
    (lambda m: m["rows"].update(l00h00q="7"), "records rows['l00h00q'] as str '7', not an integer"),
    (lambda m: m.pop("config_fingerprint"), "has no config_fingerprint"),
    (lambda m: m.update(chunk=True), "records chunk as bool True, not an integer"),
    (lambda m: m.update(example_range=[0]), "records example_range as [0], not [start, stop]"),
    (lambda m: m.update(schema_version=MANIFEST_VERSION + 1),
     f"was written by a newer qk-sniffer (schema_version {MANIFEST_VERSION + 1}; this one reads up to "
     f"{MANIFEST_VERSION}): upgrade qk-sniffer"),
])
def test_a_damaged_manifest_is_one_line_naming_the_file_at_every_reader(root, edit, what):
    cfg = base_config(root, **DEMO_CHUNKS)
    raw = json.loads(_manifest_file(root, 1).read_text())
    edit(raw)
    _manifest_file(root, 1).write_text(json.dumps(raw))
    with pytest.raises(RecordError) as exc:
        read_manifest(_manifest_file(root, 1))
    assert str(exc.value) == f"{_manifest_file(root, 1)} {what}"
    with pytest.raises(StoreError, match="delete .*chunk-1 and rerun that chunk"):
        scan_chunks(root)
    with pytest.raises(MergeError) as merge_exc:
        merge_staging(cfg)
    assert what in str(merge_exc.value) and "\n" not in str(merge_exc.value)
    assert not (root / "final" / ".merged.json").exists()
    report = verify(root)
    assert any(p.startswith("staging/chunk-1/manifest.json") and what in p for p in report.problems), report.problems
    chunk1 = [d for d in decide(cfg, root, 12).decisions if d.spec.chunk == 1][0]
    assert chunk1.runs and "its manifest cannot be read" in chunk1.why


def test_the_merge_record_reads_back_and_an_earlier_one_still_reads(root):
    cfg = base_config(root, **DEMO_CHUNKS)
    written = merge_staging(cfg)
    path = root / "final" / ".merged.json"
    assert json.loads(path.read_text()) == written and written["schema_version"] == MERGE_RECORD_VERSION
    record = read_merge_record(path)
    assert record.to_json() == written and record.split == cfg["output"]["split_name"]
    assert record.methods == {"append": 24, "rewrite": 0} and record.rows_split_total == written["rows_added_total"]
    assert merged_record(root / "final", record.split) == record
    assert merged_record(root / "final", "another_split") is None
    earlier = dict(written)
    for key in ("schema_version", "rounding_differences", "rounding_differences_total",
                "rounding_max_relative_difference", "rounding_tolerance", "methods"):
        earlier.pop(key)
    path.write_text(json.dumps(earlier))
    old = read_merge_record(path)
    assert (old.methods, old.rounding_differences_total, old.buckets) == ({}, 0, written["buckets"])
    path.write_text(json.dumps({**written, "buckets": {"q": {"3": "many"}}}))
    with pytest.raises(RecordError, match=r"records buckets\['q'\]\['3'\] as str 'many', not an integer"):
        read_merge_record(path)
    assert merged_record(root / "final", record.split) is None  # the store's reader: unreadable is no record
    report = verify(root)
    assert any(p.startswith("final/.merged.json: records buckets") for p in report.problems), report.problems


def test_record_types_are_dataclasses_with_their_version():
    man = ChunkManifest(chunk=3, split="s", config_fingerprint="f", rows={"l00h00q": 0}, files={})
    assert man.to_json()["schema_version"] == MANIFEST_VERSION and ChunkManifest.from_json(man.to_json(), "x") == man
    rec = MergeRecord(split="s")
    assert MergeRecord.from_json(rec.to_json(), "x") == rec
    with pytest.raises(RecordError, match="^x holds a JSON list, not an object$"):
        MergeRecord.from_json([], "x")
