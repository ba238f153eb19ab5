"""verify: a real dataset (tiny Llama, staged, merged, rendered) passes; each kind of damage is reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.front_matter import split_front_matter
from qk_sniffer.sampling import SHARED_HEAD, SamplerSpec, bucket_of, keep_probability, token_u
from qk_sniffer.verify import verify

from .support.tiny_data import DEMO_CHUNKS, base_config, build_final, merge_and_render

# two splits with different samplers: "tiny" (log_uniform, heads share positions) and "tiny_u"
# (uniform, per head); staging/ holds the two chunks of the last one
TINY = DEMO_CHUNKS  # staged once per session (the fixture staged_demo_chunks)
TINY_U = {"workflow": {"num_chunks": 2}, "dataset": {"max_samples": 8}, "output": {"split_name": "tiny_u"},
          "capture": {"layers": [0, 1], "sampler": {"type": "uniform", "base_rate": 3.0, "per_head": True}}}


def _build(root: Path, sections: dict) -> dict:
    shutil.rmtree(root / "staging", ignore_errors=True)
    return build_final(root, **sections)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, staged_demo_chunks) -> Path:
    root = tmp_path_factory.mktemp("verify-data") / "root"
    shutil.copytree(staged_demo_chunks / "staging", root / "staging")
    merge_and_render(root, **TINY)
    _build(root, TINY_U)
    return root


@pytest.fixture
def root(tmp_path, dataset) -> Path:
    """A fresh copy of the dataset for one test to damage."""
    dst = tmp_path / "root"
    shutil.copytree(dataset, dst)
    return dst


def _final(root: Path, split: str, config: str) -> Path:
    return root / "final" / "data" / split / config / "data.parquet"


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path, compression="zstd")


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("example_id", "ascending"), ("position", "ascending")])


def _front(root: Path) -> tuple[dict, str]:
    return split_front_matter((root / "final" / "README.md").read_text())


def _write_front(root: Path, fm: dict, body: str) -> None:
    text = "---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n" + body
    (root / "final" / "README.md").write_text(text)


def _unselected_row(path: Path, spec: SamplerSpec) -> pa.Table:
    """The file plus one plausible row (a real vector, the right bucket) that ``spec`` never selects."""
    table = pq.read_table(path)
    layer, head, kind = table["layer"][0].as_py(), table["head"][0].as_py(), table["kind"][0].as_py()
    ex = table["example_id"][0].as_py()
    have = set(pc.filter(table["position"], pc.equal(table["example_id"], ex)).to_pylist())
    hv = head if spec.per_head else SHARED_HEAD
    for pos in range(1, max(have)):
        if pos in have:
            continue
        b = int(bucket_of(np.array([pos]), spec.type, spec.min_bucket_size)[0])
        p = float(keep_probability(np.array([b]), spec.type, spec.base_rate, spec.min_bucket_size)[0])
        if token_u(spec.seed, ex, layer, hv, {"q": 0, "k": 1}[kind], pos) >= p:
            break
    else:  # pragma: no cover - the sampler keeps a fraction of positions only
        raise AssertionError("no unselected position found")
    row = table.slice(0, 1).to_pydict()
    row.update(bucket=[b], example_id=[ex], position=[pos])
    return _sorted(pa.concat_tables([table, pa.Table.from_pydict(row, schema=table.schema)]))


TINY_SPEC = SamplerSpec(type="log_uniform", base_rate=2.0, seed=0, per_head=False, min_bucket_size=8)


def _problems_naming(report, rel: str) -> list[str]:
    return [p for p in report.problems if rel in p]


# -- a clean dataset --------------------------------------------------------------------------


def test_real_dataset_passes(dataset):
    report = verify(dataset)
    assert report.ok, report.format()
    assert report.problems == [] and report.warnings == []
    finals = sorted((dataset / "final" / "data").glob("*/*/data.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in finals)
    assert report.checked["splits"] == 2
    assert report.checked["files"] == len(finals) > 24
    assert report.checked["configs"] == len({p.parent.name for p in finals})
    assert report.checked["rows"] == rows
    assert report.checked["sampled_rows"] == rows  # every file is under the per-file bound
    assert report.checked["chunks"] == 2
    staged = sum(len(json.loads(m.read_text())["files"]) for m in (dataset / "staging").glob("*/manifest.json"))
    assert report.checked["staged_files"] == staged > 0


def test_sampling_check_is_bounded_per_file(dataset):
    report = verify(dataset, sample_rows=5)
    assert report.ok, report.format()
    assert report.checked["sampled_rows"] == 5 * report.checked["files"]


def test_vectorised_u_equals_the_scalar_reference():
    from qk_sniffer.verify import sampler_u

    rng = np.random.default_rng(3)
    ex = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 50, dtype=np.int64), np.arange(50)])
    pos = rng.integers(0, 1 << 20, ex.shape[0])
    for spec in (SamplerSpec(seed=7, per_head=True), SamplerSpec(seed=2**40, per_head=False)):
        for kind in ("q", "k"):
            got = sampler_u(spec, ex, 5, 3, kind, pos)
            hv = 3 if spec.per_head else SHARED_HEAD
            want = [token_u(spec.seed, int(e), 5, hv, {"q": 0, "k": 1}[kind], int(p)) for e, p in zip(ex, pos)]
            assert got.tolist() == want


# -- damage, each on a fresh copy -------------------------------------------------------------


def _dropped_column(root):
    p = _final(root, "tiny", "l00h00q")
    _rewrite(p, pq.read_table(p).drop_columns(["sliding_window"]))
    return p, "missing column(s) sliding_window"


def _wrong_vector_length(root):
    p = _final(root, "tiny", "l01h01k")
    t = pq.read_table(p)
    short = pc.list_slice(t["vector"], 0, 8).cast(pa.list_(pa.float32(), 8))
    _rewrite(p, t.set_column(t.schema.get_field_index("vector"), pa.field("vector", short.type, nullable=False),
                             short))
    return p, "vector float32[8]"


def _duplicate_keys(root):
    p = _final(root, "tiny", "l00h01k")
    t = pq.read_table(p)
    _rewrite(p, _sorted(pa.concat_tables([t, t.slice(3, 1)])))
    return p, "1 duplicate (example_id, position) key"


def _unsorted_keys(root):
    p = _final(root, "tiny", "l02h00q")
    t = pq.read_table(p)
    _rewrite(p, t.take(pa.array(np.arange(t.num_rows)[::-1].copy())))
    return p, "not sorted"


def _layer_disagrees_with_path(root):
    p = _final(root, "tiny", "l00h02q")
    t = pq.read_table(p)
    i = t.schema.get_field_index("layer")
    _rewrite(p, t.set_column(i, t.schema.field(i), pa.array(np.full(t.num_rows, 3, np.int16))))
    return p, "column layer holds 3"


def _bucket_edited(root):
    p = _final(root, "tiny", "l01h00q")
    t = pq.read_table(p)
    b = t["bucket"].to_numpy().copy()
    b[len(b) // 2] += 1
    i = t.schema.get_field_index("bucket")
    _rewrite(p, t.set_column(i, t.schema.field(i), pa.array(b, pa.int32())))
    return p, "1 row(s) have a bucket"


def _unselected_row_added(root):
    p = _final(root, "tiny", "l01h02q")
    _rewrite(p, _unselected_row(p, TINY_SPEC))
    return p, "would not be selected by the recorded sampler"


def _unselected_row_per_head_split(root):
    p = _final(root, "tiny_u", "l01h01k")
    spec = SamplerSpec(type="uniform", base_rate=3.0, seed=0, per_head=True, min_bucket_size=8)
    _rewrite(p, _unselected_row(p, spec))
    return p, "would not be selected"


def _readme_missing_config(root):
    fm, body = _front(root)
    fm["configs"] = [c for c in fm["configs"] if c["config_name"] != "l00h00q"]
    _write_front(root, fm, body)
    return root / "final" / "README.md", "lists no config 'l00h00q'"


def _readme_config_without_file(root):
    shutil.rmtree(_final(root, "tiny", "l03h03q").parent)
    return root / "final" / "README.md", "config 'l03h03q' lists split 'tiny' but its paths match no file"


def _readme_aggregate_glob_too_wide(root):
    fm, body = _front(root)
    for c in fm["configs"]:
        if c["config_name"] == "layer01":
            c["data_files"][0]["path"] = "data/tiny/l0*h*/*.parquet"
    _write_front(root, fm, body)
    return root / "final" / "README.md", "config 'layer01', split 'tiny': its paths also match data/tiny/l00h00k"


def _readme_aggregate_misses_split(root):
    fm, body = _front(root)
    for c in fm["configs"]:
        if c["config_name"] == "all_k":
            c["data_files"] = [f for f in c["data_files"] if f["split"] != "tiny_u"]
    _write_front(root, fm, body)
    return root / "final" / "README.md", "config 'all_k' lists no data files for split 'tiny_u'"


def _staged_row_count_differs(root):
    mf = root / "staging" / "chunk-1" / "manifest.json"
    rel = json.loads(mf.read_text())["files"]["l00h00q"]
    p = mf.parent / rel
    t = pq.read_table(p)
    _rewrite(p, t.slice(1))
    return p, f"holds {t.num_rows - 1:,} rows but staging/chunk-1/manifest.json records {t.num_rows:,}"


def _truncated_parquet(root):
    p = _final(root, "tiny", "l02h01k")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, "is not readable Parquet"


def _damaged_page(root):
    """Bytes overwritten inside a data page of a file written with page checksums (zstd alone decodes garbage)."""
    p = _final(root, "tiny", "l03h00q")
    pq.write_table(pq.read_table(p), p, compression="zstd", write_page_checksum=True)
    data = bytearray(p.read_bytes())
    mid = len(data) // 3
    data[mid:mid + 64] = b"\xff" * 64
    p.write_bytes(bytes(data))
    return p, "cannot be decoded after 0 of"


def _stray_tmp_file(root):
    p = _final(root, "tiny", "l00h00q").with_name(".data.parquet.k2j3h4.tmp")
    p.write_bytes(b"partial")
    return p, "temporary or hidden file"


def _invalid_split_name(root):
    base = root / "final" / "data"
    (base / "tiny_u").rename(base / "tiny-u")
    return base / "tiny-u", "is not valid for datasets"


def _readme_without_a_split(root):
    shutil.copytree(root / "final" / "data" / "tiny_u", root / "final" / "data" / "tiny_v")
    return root / "final" / "README.md", "no config lists split 'tiny_v', which has 12 config file(s)"


DAMAGE = [_dropped_column, _wrong_vector_length, _duplicate_keys, _unsorted_keys, _layer_disagrees_with_path,
          _bucket_edited, _unselected_row_added, _unselected_row_per_head_split, _readme_missing_config,
          _readme_config_without_file, _readme_aggregate_glob_too_wide, _readme_aggregate_misses_split,
          _staged_row_count_differs, _truncated_parquet, _damaged_page,
          _stray_tmp_file, _invalid_split_name, _readme_without_a_split]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_damage_is_reported(root, damage):
    path, what = damage(root)
    report = verify(root)
    assert not report.ok
    rel = path.relative_to(root).as_posix()
    lines = _problems_naming(report, rel)
    assert lines, f"no problem names {rel}:\n{report.format()}"
    assert any(line.startswith(rel + ":") and what in line for line in lines), report.format()
    assert rel in report.format()


def test_other_files_of_the_split_are_not_blamed(root):
    _wrong_vector_length(root)
    report = verify(root)
    assert len(report.problems) == 1, report.format()


def test_a_renamed_split_is_reported_once_per_split(root):
    _invalid_split_name(root)
    report = verify(root)
    readme = [p for p in report.problems if p.startswith("final/README.md:")]
    assert len(readme) == 2, report.format()
    assert "no config lists split 'tiny-u'" in readme[0] and "lists split 'tiny_u', which has no files" in readme[1]


# -- what is not corruption -------------------------------------------------------------------


def test_incomplete_chunk_is_a_warning(root):
    (root / "staging" / "chunk-1" / "manifest.json").unlink()
    report = verify(root)
    assert report.ok, report.format()
    assert report.checked["chunks"] == 1
    assert any(w.startswith("staging/chunk-1:") and "no manifest.json" in w for w in report.warnings)


def test_without_a_recorded_sampler_the_check_is_skipped_or_taken_from_the_config(root, tmp_path):
    fm, body = _front(root)
    del fm["qk_sniffer"]
    _write_front(root, fm, body)
    (root / "final" / ".merged.json").unlink()
    p = _final(root, "tiny", "l01h02q")
    _rewrite(p, _unselected_row(p, TINY_SPEC))

    report = verify(root)
    assert report.ok, report.format()
    skipped = [w for w in report.warnings if "bucket and sampling checks skipped" in w]
    assert {w.split(":")[0] for w in skipped} == {"final/data/tiny", "final/data/tiny_u"}
    assert report.checked["sampled_rows"] == 0

    cfg = base_config(root, **TINY)  # the config of split "tiny" supplies its sampler
    report = verify(root, cfg=cfg)
    assert not report.ok
    assert any(line.startswith("final/data/tiny/l01h02q/data.parquet:") and "would not be selected" in line
               for line in report.problems), report.format()
    # staging/ holds the other split's chunks: merge with this config would refuse them
    assert any("was produced by another config" in w for w in report.warnings)


def test_rows_appended_with_other_sampling_settings(root):
    """A split appended with another seed (allowed by the config) passes; rows fit one of the recorded samplers."""
    mixed = {**TINY_U, "capture": {**TINY_U["capture"], "sampler": {**TINY_U["capture"]["sampler"], "seed": 5}},
             "output": {**TINY_U["output"], "allow_mixed_sampling": True}}
    before = pq.ParquetFile(_final(root, "tiny_u", "l00h00q")).metadata.num_rows
    _build(root, mixed)
    assert pq.ParquetFile(_final(root, "tiny_u", "l00h00q")).metadata.num_rows > before
    report = verify(root)
    assert report.ok, report.format()

    # forget the history: the rows of the first capture no longer fit the recorded sampler
    fm, body = _front(root)
    fm["qk_sniffer"]["splits"]["tiny_u"].pop("previous_sampling")
    _write_front(root, fm, body)
    merged = json.loads((root / "final" / ".merged.json").read_text())
    merged["mixed_sampling"] = None
    (root / "final" / ".merged.json").write_text(json.dumps(merged))
    report = verify(root)
    assert not report.ok
    assert any(line.startswith("final/data/tiny_u/") and "would not be selected" in line for line in report.problems)

    # only .merged.json left: it names the last two samplers, not necessarily every one, so the checks are skipped
    del fm["qk_sniffer"]
    _write_front(root, fm, body)
    merged["mixed_sampling"] = {"recorded": fm_sampling(TINY_U), "recorded_in": "README.md"}
    (root / "final" / ".merged.json").write_text(json.dumps(merged))
    report = verify(root)
    assert report.ok, report.format()
    assert any(w.startswith("final/data/tiny_u:") and "appended with other sampling settings" in w
               for w in report.warnings), report.format()


def fm_sampling(sections: dict) -> dict:
    from qk_sniffer.config import sampling_settings

    return sampling_settings(base_config(Path("unused"), **sections))


def test_report_format(root):
    _duplicate_keys(root)
    (root / "staging" / "chunk-0" / "manifest.json").unlink()
    report = verify(root)
    text = report.format()
    lines = text.splitlines()
    assert lines[0].startswith(f"verify {root}: FAILED: 1 problem(s), 2 warning(s)")
    assert "2 split(s)" in lines[0] and f"{report.checked['rows']:,} rows" in lines[0]
    assert lines[1] == "problems:"
    assert lines[2].startswith("  - final/data/tiny/l00h01k/data.parquet: 1 duplicate")
    assert lines[3] == "warnings:"
    # the card's row count is now stale, and chunk-0 lost its manifest
    assert sorted(line.split(":")[0] for line in lines[4:]) == ["  - final/README.md", "  - staging/chunk-0"]
    assert all(line.startswith("  - ") for line in lines[4:])
    clean = verify(root.parent / "nowhere")
    assert not clean.ok and "is not a directory" in clean.format()
