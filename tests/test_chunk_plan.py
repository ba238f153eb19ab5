"""Chunk layout and rerun decisions from what a data root records (qk_sniffer.chunk.plan), on real chunks."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from qk_sniffer.chunk.plan import decide, layout, manifest_fingerprint_matches, plan_path, recorded_layout, write_plans
from qk_sniffer.chunk.run import run_chunk
from qk_sniffer.config import ConfigError, chunk_fingerprint, legacy_chunk_fingerprint
from qk_sniffer.layout import manifest_path
from qk_sniffer.records import ChunkManifest

from .support.tiny_data import base_config


def test_a_fresh_root_is_divided_by_num_chunks_and_keeps_its_ranges_when_extended():
    assert layout(10, 4, None, [], None) == ([(0, 2), (2, 5), (5, 7), (7, 10)], 3, "")
    recorded = [(0, 2), (2, 5), (5, 7), (7, 10)]
    ranges, size, note = layout(20, 4, None, recorded, 3)
    assert ranges == recorded + [(10, 13), (13, 16), (16, 19), (19, 20)] and size == 3
    assert "workflow.num_chunks=4 divides only a fresh data root" in note
    # the same examples: the same chunks, whatever num_chunks says now
    assert layout(10, 8, None, recorded, 3)[0] == recorded
    # fewer examples: the plan ends at the chunk holding the new end
    assert layout(6, 4, None, recorded, 3)[0] == [(0, 2), (2, 5), (5, 6)]
    # an explicit chunk size: blocks; another size than the recorded one divides again
    assert layout(10, 4, 4, [], None)[:2] == ([(0, 4), (4, 8), (8, 10)], 4)
    ranges, size, note = layout(10, 4, 5, recorded, 3)
    assert ranges == [(0, 5), (5, 10)] and "divided again" in note
    assert layout(12, 1, 3, recorded, 3)[0] == recorded + [(10, 12)]
    # more chunks than examples: empty, recorded chunks
    assert layout(2, 4, None, [], None)[0] == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_a_stream_of_unknown_length_is_one_chunk():
    assert layout(None, 1, None, [], None)[0] == [(0, None)]
    with pytest.raises(ConfigError, match=r"^dataset.streaming: .*set dataset.max_samples"):
        layout(None, 2, None, [], None)


def test_legacy_fingerprints_still_match():
    cfg = base_config("unused", workflow={"num_chunks": 3})
    def manifest(**fields) -> ChunkManifest:  # a version 1 manifest: no schema_version, num_chunks in its fingerprint
        return ChunkManifest.from_json({"chunk": 0, "split": "tiny", "rows": {}, "files": {}, **fields}, "manifest.json")

    old = {"config_fingerprint": legacy_chunk_fingerprint(cfg, 40, 3), "num_chunks": 3, "dataset": {"max_samples": 40}}
    assert manifest_fingerprint_matches(manifest(**old), cfg)
    assert not manifest_fingerprint_matches(manifest(**{**old, "num_chunks": 2}), cfg)
    assert manifest_fingerprint_matches(manifest(config_fingerprint=chunk_fingerprint(cfg)), cfg)
    # max_samples and the chunking are not in the fingerprint; a setting that changes rows is
    assert chunk_fingerprint(base_config("x", dataset={"max_samples": 7}, workflow={"num_chunks": 9})) == \
        chunk_fingerprint(cfg)
    assert chunk_fingerprint(base_config("x", capture={"sampler": {"base_rate": 0.5}})) != chunk_fingerprint(cfg)


@pytest.fixture(scope="module")
def two_chunks(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan") / "root"
    cfg = base_config(root, dataset={"max_samples": 12}, tokenizer={"max_length": 32}, workflow={"num_chunks": 2})
    for k in range(2):
        run_chunk(cfg, k)
    return root


def test_decisions_come_from_the_manifests(two_chunks, tmp_path):
    root = shutil.copytree(two_chunks, tmp_path / "root", symlinks=True)
    cfg = base_config(root, dataset={"max_samples": 12}, tokenizer={"max_length": 32}, workflow={"num_chunks": 2})
    assert recorded_layout(root) == ([(0, 6), (6, 12)], 6)
    same = decide(cfg, root, 12)
    assert [(d.spec.start, d.spec.stop, d.runs) for d in same.decisions] == [(0, 6, False), (6, 12, False)]

    grown = decide(cfg, root, 20)
    assert [(d.spec.start, d.spec.stop, d.runs, d.why) for d in grown.decisions][2:] == \
        [(12, 18, True, "it has not run yet"), (18, 20, True, "it has not run yet")]
    assert grown.summary()[0].endswith("4 chunk(s) of up to 6 examples; 2 to run, 2 up to date")

    changed = base_config(root, dataset={"max_samples": 12}, tokenizer={"max_length": 33})
    why = [d.why for d in decide(changed, root, 12).decisions]
    assert why == ["the config changed: tokenizer.max_length: 32 -> 33"] * 2

    # the plan files tell Snakemake: older than the manifest when up to date, newer when the chunk runs
    write_plans(decide(changed, root, 12))
    for k in range(2):
        assert os.path.getmtime(plan_path(root, k)) > os.path.getmtime(manifest_path(root, k))
    write_plans(same)
    for k in range(2):
        assert os.path.getmtime(plan_path(root, k)) < os.path.getmtime(manifest_path(root, k))
        assert json.loads(plan_path(root, k).read_text())["fingerprint"] == chunk_fingerprint(cfg)
    write_plans(decide(cfg, root, 6))  # fewer chunks: the plan file of the chunk left out is removed
    assert not plan_path(root, 1).exists()


def test_a_chunk_run_outside_the_workflow_plans_as_the_workflow_does(tmp_path):
    root = tmp_path / "root"
    cfg = base_config(root, dataset={"max_samples": 10}, tokenizer={"max_length": 32}, workflow={"num_chunks": 4})
    ranges = [run_chunk(cfg, k)["example_range"] for k in (0, 3)]
    assert ranges == [[0, 2], [7, 10]]  # chunk 3 ran after chunk 0, planned as the whole layout was
    with pytest.raises(ConfigError, match=r"^--chunk: 4 is not a chunk of .*0\.\.3"):
        run_chunk(cfg, 4)
