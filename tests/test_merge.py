"""merge_staging on chunks staged by real runs of the tiny Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.card import render_readme
from qk_sniffer.front_matter import split_front_matter
from qk_sniffer.layout import data_file, parse_config_name
from qk_sniffer.merge import MergeError, merge_staging
from qk_sniffer.parquet import read_footer

from .support.tiny_data import DEMO_CHUNKS, base_config, merged_sections, stage_chunks
from .support.workflow_runs import final_files

SECTIONS = DEMO_CHUNKS  # what the session fixture staged_demo_chunks staged
SPLIT = "tiny"
KEYS = ["example_id", "position"]


def _stage(root: Path, **sections) -> Path:
    stage_chunks(root, **sections)
    return root


@pytest.fixture
def staged(staged_demo_chunks) -> Path:
    """Two chunks of 12 examples (6 + 6), every layer and head (the session's, ``SECTIONS``); copied by each test."""
    return staged_demo_chunks


@pytest.fixture(scope="module")
def staged_more(tmp_path_factory) -> Path:
    """The same capture over 20 examples: its first 12 overlap ``staged``."""
    return _stage(tmp_path_factory.mktemp("merge-staged-more") / "root", workflow={"num_chunks": 2},
                  dataset={"max_samples": 20})


def _root(tmp_path: Path, staged: Path, chunks=(0, 1)) -> Path:
    root = tmp_path / "root"
    for i in chunks:
        shutil.copytree(staged / "staging" / f"chunk-{i}", root / "staging" / f"chunk-{i}")
    return root


def _cfg(root: Path, **extra) -> dict:
    return base_config(root, **merged_sections(SECTIONS, extra))


def _staged_files(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for mf in sorted((root / "staging").glob("chunk-*/manifest.json")):
        man = json.loads(mf.read_text())
        for name, rel in man["files"].items():
            out.setdefault(name, []).append(mf.parent / rel)
    return out


def _expected(paths: list[Path]) -> pl.DataFrame:
    frames = [pl.from_arrow(pq.read_table(p)) for p in paths]
    return pl.concat(frames).unique(subset=KEYS, keep="first").sort(KEYS)


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {n: (p.stat().st_mtime_ns, p.stat().st_ino) for n, p in final_files(root).items()}


def test_merge_equals_independent_union(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    result = merge_staging(cfg)
    staged_files = _staged_files(root)
    finals = final_files(root)
    assert set(finals) == set(staged_files) and len(finals) == 24
    bucket_rows: dict[str, dict[int, int]] = {"q": {}, "k": {}}
    for name, paths in staged_files.items():
        got = pl.read_parquet(finals[name])
        want = _expected(paths)
        assert got.equals(want), name
        assert got.select(KEYS).is_unique().all()
        assert pq.read_schema(finals[name]).equals(pq.read_schema(paths[0]))
        meta = pq.ParquetFile(finals[name]).metadata
        assert meta.row_group(0).column(0).compression == "ZSTD"
        assert result["rows_added"][name] == result["rows_total"][name] == want.height
        kind = parse_config_name(name)[2]
        for b, n in want.group_by("bucket").len().iter_rows():
            bucket_rows[kind][b] = bucket_rows[kind].get(b, 0) + n
    assert result["buckets"] == {k: {str(b): n for b, n in sorted(v.items())} for k, v in bucket_rows.items()}
    assert sorted(result["configs_touched"]) == sorted(staged_files)
    assert result["methods"] == {"append": 24, "rewrite": 0}  # disjoint, sorted chunks: appended byte for byte
    assert result["conflicts"] == {} and result["incomplete_chunks"] == []
    mans = [json.loads(p.read_text()) for p in sorted((root / "staging").glob("chunk-*/manifest.json"))]
    assert [c["example_range"] for c in result["chunks"]] == [m["example_range"] for m in mans]
    assert [c["tokens"] for c in result["chunks"]] == [m["tokens"] for m in mans]
    assert result["rows_split_total"] == sum(sum(m["rows"].values()) for m in mans)
    assert result["run"]["model"]["head_dim"] == 16 and result["run"]["timings"]["chunks"] == 2
    on_disk = json.loads((root / "final" / ".merged.json").read_text())
    assert on_disk == json.loads(json.dumps(result))


def test_append_and_rewrite_give_the_same_files(tmp_path, staged):
    appended = merge_staging(_cfg(a := _root(tmp_path / "a", staged)))
    rewritten = merge_staging(_cfg(b := _root(tmp_path / "b", staged)), append=False)
    assert appended["methods"] == {"append": 24, "rewrite": 0} and rewritten["methods"] == {"append": 0, "rewrite": 24}
    for key in ("rows_added", "rows_total", "buckets", "conflicts"):
        assert appended[key] == rewritten[key], key
    fa, fb = final_files(a), final_files(b)
    assert set(fa) == set(fb)
    for name in fa:
        got = pq.ParquetFile(fa[name], page_checksum_verification=True)
        assert got.read().equals(pq.read_table(fb[name])), name  # same rows, same order, same schema
        assert got.metadata.num_row_groups == 2  # one per chunk, each as sniff-chunk wrote it
        for i in range(2):
            rg = got.metadata.row_group(i)
            assert [c.column_index for c in rg.sorting_columns] == [1, 2]
            assert rg.column(1).statistics.has_min_max
        assert pl.read_parquet(fa[name]).equals(pl.read_parquet(fb[name]))


def test_unsorted_or_foreign_staged_file_is_rewritten(tmp_path, staged):
    root = _root(tmp_path, staged)
    shuffled = root / "staging" / "chunk-1" / "data" / SPLIT / "l00h00q" / "data.parquet"
    t = pq.read_table(shuffled)
    pq.write_table(t.take(pa.array(list(range(t.num_rows))[::-1])), shuffled)  # same rows, reversed
    plain = root / "staging" / "chunk-1" / "data" / SPLIT / "l01h01k" / "data.parquet"
    t = pq.read_table(plain)
    pq.write_table(t.replace_schema_metadata({"writer": "someone else"}), plain)  # sorted, other footer metadata
    result = merge_staging(_cfg(root))
    assert result["methods"] == {"append": 22, "rewrite": 2}
    for name, paths in _staged_files(root).items():
        got = pl.read_parquet(final_files(root)[name])
        assert got.equals(_expected(paths)), name


def test_footer_that_cannot_be_carried_over_falls_back_to_rewrite(tmp_path, staged, monkeypatch):
    from qk_sniffer.merge import append as merge_module
    from qk_sniffer.parquet import FooterError

    def refuse(sources, dest, footers=None):
        raise FooterError(f"{sources[0]}: an offset in its footer points past its row groups")

    monkeypatch.setattr(merge_module, "concat_files", refuse)
    root = _root(tmp_path, staged)
    result = merge_staging(_cfg(root))
    assert result["methods"] == {"append": 0, "rewrite": 24}
    for name, paths in _staged_files(root).items():
        assert pl.read_parquet(final_files(root)[name]).equals(_expected(paths)), name


def test_appends_read_each_staged_files_keys_and_ignore_old_manifest_records(tmp_path, staged, monkeypatch):
    from qk_sniffer.merge import append as merge_module

    read = []
    real = merge_module._read_span
    monkeypatch.setattr(merge_module, "_read_span", lambda footer: read.append(footer.path) or real(footer))
    root = _root(tmp_path / "a", staged)
    assert merge_staging(_cfg(root))["methods"] == {"append": 24, "rewrite": 0}
    assert sorted(read) == sorted(p for paths in _staged_files(root).values() for p in paths)  # keys of every file
    for name, paths in _staged_files(root).items():
        assert pl.read_parquet(final_files(root)[name]).equals(_expected(paths)), name
    # manifests of an earlier qk-sniffer kept a record of each file (keys, offsets); a stale one is never trusted
    other = _root(tmp_path / "b", staged)
    for mf in (other / "staging").glob("chunk-*/manifest.json"):
        man = json.loads(mf.read_text())
        man["summaries"] = {n: {"rows": 1, "first_key": [0, 0], "last_key": [0, 0], "buckets": {"0": 1},
                                "row_group_offsets": {"row_groups": [0, 0, 0], "offsets": []}} for n in man["files"]}
        mf.write_text(json.dumps(man))
    result = merge_staging(_cfg(other))
    assert result["methods"] == {"append": 24, "rewrite": 0}
    assert result["buckets"] == json.loads((root / "final" / ".merged.json").read_text())["buckets"]
    for name, path in final_files(root).items():
        assert path.read_bytes() == final_files(other)[name].read_bytes()


def test_a_staged_file_replaced_after_its_chunk_is_read_as_it_is(tmp_path, staged):
    from qk_sniffer.parquet import write_parquet_atomic

    root = _root(tmp_path, staged)
    # chunk 1's file replaced by chunk 0's rows (sorted, in the final format): its keys overlap chunk 0's
    name = "l02h01q"
    replaced = root / "staging" / "chunk-1" / "data" / SPLIT / name / "data.parquet"
    write_parquet_atomic(pq.read_table(root / "staging" / "chunk-0" / "data" / SPLIT / name / "data.parquet"),
                         replaced)
    man = json.loads((root / "staging" / "chunk-1" / "manifest.json").read_text())
    man["rows"][name] = pq.ParquetFile(replaced).metadata.num_rows
    (root / "staging" / "chunk-1" / "manifest.json").write_text(json.dumps(man))
    result = merge_staging(_cfg(root))
    # appending would have kept every key twice; reading the file's keys finds the overlap
    assert result["methods"] == {"append": 23, "rewrite": 1}
    got = pl.read_parquet(final_files(root)[name])
    assert got.select(KEYS).is_unique().all()
    assert got.equals(_expected(_staged_files(root)[name]))


def test_second_merge_rewrites_nothing(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    merge_staging(cfg)
    before = _stamps(root)
    data = {n: p.read_bytes() for n, p in final_files(root).items()}
    again = merge_staging(cfg)
    assert again["configs_touched"] == [] and again["rows_added_total"] == 0
    assert _stamps(root) == before
    assert {n: p.read_bytes() for n, p in final_files(root).items()} == data
    assert not list((root / "final").rglob("*.tmp"))


def test_final_rows_win_and_conflicts_are_counted(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    merge_staging(cfg)
    final = data_file(root / "final", SPLIT, "l00h00q")
    original = pl.read_parquet(final)
    stamp = final.stat().st_mtime_ns
    # a staged rerun whose first three vectors came out different
    staged_file = root / "staging" / "chunk-0" / "data" / SPLIT / "l00h00q" / "data.parquet"
    table = pq.read_table(staged_file)
    df = pl.from_arrow(table)
    tampered = df.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(pl.col("vector") * 2 + 1).otherwise(pl.col("vector")).alias("vector")
    )
    pq.write_table(tampered.to_arrow().cast(table.schema), staged_file)
    result = merge_staging(cfg)
    assert result["conflicts"]["l00h00q"]["count"] == 3
    assert result["conflicts"]["l00h00q"]["examples"] == sorted(list(r) for r in tampered.head(3).select(KEYS).iter_rows())
    assert result["conflicts_total"] == 3 and result["configs_touched"] == []
    assert final.stat().st_mtime_ns == stamp
    assert pl.read_parquet(final).equals(original)
    recorded = json.loads((root / "final" / ".merged.json").read_text())
    assert recorded["conflicts"]["l00h00q"]["count"] == 3


def test_later_chunk_adds_only_its_rows(tmp_path, staged):
    root = _root(tmp_path, staged, chunks=(0,))
    cfg = _cfg(root)
    first = merge_staging(cfg)
    assert first["rows_split_total"] == sum(first["rows_added"].values())
    old = {n: pl.read_parquet(p) for n, p in final_files(root).items()}
    old_bytes = {n: (p.read_bytes(), read_footer(p).body_end) for n, p in final_files(root).items()}
    shutil.copytree(staged / "staging" / "chunk-1", root / "staging" / "chunk-1")
    second = merge_staging(cfg)
    assert second["methods"] == {"append": 24, "rewrite": 0}
    man1 = json.loads((root / "staging" / "chunk-1" / "manifest.json").read_text())
    for name, frame in old.items():
        assert second["rows_added"][name] == man1["rows"][name]
        path = data_file(root / "final", SPLIT, name)
        new = pl.read_parquet(path)
        assert new.height == frame.height + man1["rows"][name]
        assert new.join(frame, on=KEYS, how="semi").equals(frame)
        assert new.equals(_expected(_staged_files(root)[name]))
        data, body_end = old_bytes[name]
        assert path.read_bytes()[:body_end] == data[:body_end]  # the published pages are untouched


def test_more_examples_append_only_new_keys(tmp_path, staged, staged_more):
    root = _root(tmp_path, staged)
    merge_staging(_cfg(root))
    old = {n: pl.read_parquet(p) for n, p in final_files(root).items()}
    shutil.rmtree(root / "staging")
    shutil.copytree(staged_more / "staging", root / "staging")
    cfg = base_config(root, workflow={"num_chunks": 2}, dataset={"max_samples": 20})
    result = merge_staging(cfg)
    assert result["methods"] == {"append": 0, "rewrite": 24}  # the keys interleave with the final rows
    assert result["conflicts_total"] == 0 and result["rounding_max_relative_difference"] <= 1e-5
    staged_files = _staged_files(root)
    for name, frame in old.items():
        incoming = _expected(staged_files[name])
        fresh = incoming.join(frame, on=KEYS, how="anti")
        both = incoming.join(frame.select([*KEYS, pl.col("vector").alias("old")]), on=KEYS, how="inner")
        assert result["rows_added"][name] == fresh.height > 0
        # the overlapping examples ran in other batches: their vectors differ by float rounding, never by more
        assert name not in result["conflicts"]
        assert result["rounding_differences"].get(name, {"count": 0})["count"] == both.filter(
            pl.col("vector") != pl.col("old")).height
        merged = pl.read_parquet(data_file(root / "final", SPLIT, name))
        assert merged.height == frame.height + fresh.height
        assert merged.join(frame, on=KEYS, how="semi").equals(frame)  # old rows kept as they were
        assert merged.select(KEYS).is_unique().all()
        assert merged.select(KEYS).equals(merged.select(KEYS).sort(KEYS))


def test_mixed_sampling_refused_unless_allowed(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    merge_staging(cfg)
    readme = render_readme(cfg)
    fm, body = split_front_matter(readme.read_text())
    fm["qk_sniffer"]["splits"][SPLIT]["sampling"]["base_rate"] = 1.0  # as if captured elsewhere with rate 1
    readme.write_text("---\n" + yaml.safe_dump(fm, sort_keys=False) + "---\n" + body)
    with pytest.raises(MergeError) as err:
        merge_staging(cfg)
    msg = str(err.value)
    assert "base_rate" in msg and "allow_mixed_sampling" in msg and str(readme) in msg
    result = merge_staging(_cfg(root, output={"allow_mixed_sampling": True}))
    assert result["mixed_sampling"]["recorded"]["base_rate"] == 1.0
    render_readme(_cfg(root, output={"allow_mixed_sampling": True}))
    fm, _ = split_front_matter(readme.read_text())
    meta = fm["qk_sniffer"]["splits"][SPLIT]
    assert meta["sampling"]["base_rate"] == 2.0 and meta["previous_sampling"][0]["base_rate"] == 1.0


def test_mixed_sampling_read_from_merged_json_without_card(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    merge_staging(cfg)
    merged = root / "final" / ".merged.json"
    rec = json.loads(merged.read_text())
    rec["sampling"]["seed"] = 7
    merged.write_text(json.dumps(rec))
    with pytest.raises(MergeError, match="seed"):
        merge_staging(cfg)


def test_stale_chunks_refused(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root, tokenizer={"max_length": 64})  # other rows: the staged chunks' fingerprint is not this config's
    with pytest.raises(MergeError) as err:
        merge_staging(cfg)
    msg = str(err.value)
    assert str(root / "staging" / "chunk-0") in msg and str(root / "staging" / "chunk-1") in msg
    assert "Delete" in msg
    assert not (root / "final").exists()


def test_corrupted_final_refused_and_untouched(tmp_path, staged):
    root = _root(tmp_path, staged)
    cfg = _cfg(root)
    merge_staging(cfg)
    victim = data_file(root / "final", SPLIT, "l01h00q")
    damaged = victim.read_bytes()[: victim.stat().st_size // 2]  # an interrupted copy
    victim.write_bytes(damaged)
    # new rows for every config, so the merge would have to rewrite the damaged file
    for p in sorted((root / "final" / "data" / SPLIT).glob("*/data.parquet")):
        if p != victim:
            t = pq.read_table(p)
            pq.write_table(t.slice(0, t.num_rows // 2), p)
    stamps = _stamps(root)
    with pytest.raises(MergeError) as err:
        merge_staging(cfg)
    msg = str(err.value)
    assert str(victim) in msg and "not readable Parquet" in msg and "delet" in msg
    assert victim.read_bytes() == damaged
    assert _stamps(root) == stamps  # checked before anything was written


def test_incomplete_chunk_ignored_and_reported(tmp_path, staged):
    root = _root(tmp_path, staged)
    # a crashed chunk: files but no manifest; its rows must not appear
    crashed = root / "staging" / "chunk-7" / "data" / SPLIT / "l00h00q"
    crashed.mkdir(parents=True)
    t = pq.read_table(root / "staging" / "chunk-0" / "data" / SPLIT / "l00h00q" / "data.parquet")
    pq.write_table(t.set_column(1, "example_id", pa.array([10_000] * t.num_rows, pa.int64())), crashed / "data.parquet")
    result = merge_staging(_cfg(root))
    assert result["incomplete_chunks"] == ["chunk-7"]
    assert [c["chunk"] for c in result["chunks"]] == [0, 1]
    got = pl.read_parquet(data_file(root / "final", SPLIT, "l00h00q"))
    assert got.equals(_expected(_staged_files(root)["l00h00q"]))
    assert 10_000 not in got["example_id"].to_list()


def test_schema_mismatch_refused(tmp_path, staged):
    root = _root(tmp_path, staged)
    p = root / "staging" / "chunk-1" / "data" / SPLIT / "l00h00q" / "data.parquet"
    t = pq.read_table(p)
    short = pa.FixedSizeListArray.from_arrays(
        pa.array(pl.from_arrow(t)["vector"].arr.head(8).list.explode().to_numpy(), pa.float32()), 8)
    pq.write_table(t.set_column(3, "vector", short), p)
    with pytest.raises(MergeError) as err:
        merge_staging(_cfg(root))
    msg = str(err.value)
    assert "l00h00q" in msg and "[8]" in msg and "[16]" in msg and str(p) in msg
    assert not list((root / "final").rglob("*.parquet"))


def test_missing_staged_file_refused(tmp_path, staged):
    root = _root(tmp_path, staged)
    p = root / "staging" / "chunk-0" / "data" / SPLIT / "l02h01k" / "data.parquet"
    p.unlink()
    with pytest.raises(MergeError, match="chunk-0") as err:
        merge_staging(_cfg(root))
    assert "rerun" in str(err.value)
