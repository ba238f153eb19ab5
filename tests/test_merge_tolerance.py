"""Conflicts against rounding differences (merge.ROUNDING_RTOL), on files staged by real runs of the tiny Llama.

Each test stages a chunk with the real sniff-chunk code, merges it, then changes some vectors of the staged
files (written again the way the project writes them) and merges again: the final rows stay as they were, and
``final/.merged.json`` counts each changed row as a rounding difference or a conflict.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qk_sniffer.layout import data_file
from qk_sniffer.merge import CONFLICT, ROUNDING, ROUNDING_RTOL, SAME, compare_vectors, merge_staging
from qk_sniffer.parquet import write_parquet_atomic

from .support.tiny_data import base_config

SPLIT = "tiny"
KEYS = ["example_id", "position"]
SECTIONS = {"dataset": {"max_samples": 12}, "workflow": {"num_chunks": 1}}


def _stage(root: Path, **sections) -> dict:
    """Chunk 0 of one chunk, staged by the real sniff-chunk code; returns the config."""
    from qk_sniffer.chunk.run import run_chunk

    cfg = base_config(root, **{**SECTIONS, **sections})
    assert cfg["workflow"]["num_chunks"] == 1
    run_chunk(cfg, 0)
    return cfg


def _staged(tmp_path_factory, tag: str, **sections) -> Path:
    root = tmp_path_factory.mktemp(f"tol-{tag}") / "root"
    _stage(root, **sections)
    return root


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """12 examples staged once (float32 vectors); each test merges a copy."""
    return _staged(tmp_path_factory, "f32")


def _copy(tmp_path: Path, src: Path, **sections) -> tuple[Path, dict]:
    root = tmp_path / "root"
    shutil.copytree(src / "staging", root / "staging")
    return root, base_config(root, **{**SECTIONS, **sections})


def _staged_file(root: Path, name: str, chunk: int = 0) -> Path:
    return data_file(root / "staging" / f"chunk-{chunk}", SPLIT, name)


def _vectors(table: pa.Table) -> np.ndarray:
    vec = table.column("vector").combine_chunks()
    return vec.values.to_numpy(zero_copy_only=False).reshape(len(vec), -1).copy()


def _rewrite_vectors(path: Path, change) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Apply ``change(vectors)`` (in place, an ``(n, dim)`` array) to a staged file and write it again as sniff-chunk
    writes files; returns the vectors before and after, and the table as it was."""
    table = pq.read_table(path)
    before = _vectors(table)
    after = before.copy()
    change(after)
    typ = table.schema.field("vector").type
    arr = pa.FixedSizeListArray.from_arrays(pa.array(after.reshape(-1), type=typ.value_type), typ.list_size)
    i = table.schema.get_field_index("vector")
    write_parquet_atomic(table.set_column(i, table.schema.field("vector"), arr).cast(table.schema), path)
    return before, after, table


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rule's relative difference, row by row, written out independently of qk_sniffer.merge."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.abs(a - b).max(axis=1) / np.maximum(np.abs(a).max(axis=1), np.abs(b).max(axis=1))


def _nudge_largest(v: np.ndarray, rows, rels) -> None:
    """Move each row's largest element away from zero by ``rel`` times that element (float32)."""
    for r, rel in zip(rows, rels):  # a handful of rows of a test fixture
        j = int(np.argmax(np.abs(v[r])))
        v[r, j] = v.dtype.type(float(v[r, j]) * (1 + rel))


def _final_state(root: Path) -> dict[str, bytes]:
    final = root / "final"
    return {str(p.relative_to(final)): p.read_bytes() for p in sorted(final.rglob("*"))
            if p.is_file() and p.name != ".merged.json"}


def _keys(table: pa.Table, rows) -> list[list[int]]:
    ex, pos = table.column("example_id").to_numpy(), table.column("position").to_numpy()
    return sorted([int(ex[r]), int(pos[r])] for r in rows)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_rounding_level_perturbations_are_not_conflicts(tmp_path, staged, caplog):
    """(a) perturbations of 1e-7..2e-6 relative: no conflict, every one a rounding difference; (d) final kept."""
    root, cfg = _copy(tmp_path, staged)
    merge_staging(cfg)
    before_final = _final_state(root)
    name = "l00h00q"
    n_rows = pq.read_metadata(_staged_file(root, name)).num_rows
    rows = np.unique(np.linspace(0, n_rows - 1, 20).astype(int))
    rels = np.geomspace(1e-7, 2e-6, len(rows))
    before, after, _ = _rewrite_vectors(_staged_file(root, name), lambda v: _nudge_largest(v, rows, rels))
    realized = _relative(after, before)
    assert np.count_nonzero(realized) == len(rows) and realized.max() <= 2.2e-6  # each row really changed
    caplog.set_level(logging.INFO, logger="qk_sniffer")
    result = merge_staging(cfg)
    assert result["conflicts"] == {} and result["conflicts_total"] == 0
    assert result["rounding_differences"] == {
        name: {"count": len(rows), "max_relative_difference": pytest.approx(realized.max(), rel=1e-6)}}
    assert result["rounding_differences_total"] == len(rows)
    assert result["rounding_max_relative_difference"] == pytest.approx(realized.max(), rel=1e-6)
    assert result["rounding_tolerance"] == ROUNDING_RTOL
    assert not [m for m in _warnings(caplog) if "conflict" in m]
    assert any("float rounding" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert result["configs_touched"] == [] and _final_state(root) == before_final
    recorded = json.loads((root / "final" / ".merged.json").read_text())
    assert recorded["rounding_differences"][name]["count"] == len(rows) and recorded["conflicts_total"] == 0


def test_a_large_perturbation_is_a_conflict(tmp_path, staged, caplog):
    """(b) 1e-2 relative: one conflict, with its key and the warning; (d) final kept."""
    root, cfg = _copy(tmp_path, staged)
    merge_staging(cfg)
    before_final = _final_state(root)
    name = "l01h01k"
    _, _, table = _rewrite_vectors(_staged_file(root, name), lambda v: _nudge_largest(v, [3], [1e-2]))
    result = merge_staging(cfg)
    assert result["conflicts"] == {name: {"count": 1, "examples": _keys(table, [3])}}
    assert result["conflicts_total"] == 1
    assert result["rounding_differences"] == {} and result["rounding_differences_total"] == 0
    assert [m for m in _warnings(caplog) if name in m and "conflict" in m]
    assert result["configs_touched"] == [] and _final_state(root) == before_final


def test_rounding_differences_and_conflicts_in_one_merge(tmp_path, staged, caplog):
    """(c) both kinds in one config and a conflict in another: each counted as what it is; (d) final kept."""
    root, cfg = _copy(tmp_path, staged)
    merge_staging(cfg)
    before_final = _final_state(root)
    frames = {n: pl.read_parquet(p) for n, p in
              ((p.parent.name, p) for p in (root / "final" / "data" / SPLIT).glob("*/data.parquet"))}
    small, large = [0, 5, 9, 14, 20, 31], [2, 11]
    rels = [1e-7, 3e-7, 6e-7, 1e-6, 1.5e-6, 2e-6]
    before, after, table = _rewrite_vectors(
        _staged_file(root, "l00h01q"),
        lambda v: (_nudge_largest(v, small, rels), _nudge_largest(v, large, [1e-2, -5e-2])))
    _, _, other = _rewrite_vectors(_staged_file(root, "l01h00k"), lambda v: _nudge_largest(v, [7], [0.5]))
    result = merge_staging(cfg)
    assert result["conflicts"] == {"l00h01q": {"count": 2, "examples": _keys(table, large)},
                                   "l01h00k": {"count": 1, "examples": _keys(other, [7])}}
    assert result["conflicts_total"] == 3
    realized = _relative(after, before)[small]
    assert result["rounding_differences"] == {
        "l00h01q": {"count": len(small), "max_relative_difference": pytest.approx(realized.max(), rel=1e-6)}}
    assert result["rounding_differences_total"] == len(small)
    assert sorted(m.split(":")[0] for m in _warnings(caplog) if "conflict" in m) == [f"{SPLIT}/l00h01q",
                                                                                    f"{SPLIT}/l01h00k"]
    assert result["configs_touched"] == [] and _final_state(root) == before_final
    for n, frame in frames.items():  # every final row as it was, vectors included
        assert pl.read_parquet(data_file(root / "final", SPLIT, n)).equals(frame)


def test_the_same_key_staged_twice_is_compared_by_the_same_rule(tmp_path, staged):
    """Two chunks staging the same rows (one with changed vectors), merged at once: the first chunk's rows are kept;
    the second's count as rounding differences or conflicts exactly as against final rows."""
    root, cfg = _copy(tmp_path, staged)
    shutil.copytree(root / "staging" / "chunk-0", root / "staging" / "chunk-1")
    manifest = root / "staging" / "chunk-1" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "chunk": 1}))
    name = "l01h01q"
    before, after, table = _rewrite_vectors(_staged_file(root, name, chunk=1),
                                            lambda v: _nudge_largest(v, [1, 4, 8, 12], [2e-7, 1e-6, 2e-6, 3e-2]))
    result = merge_staging(cfg)
    assert result["conflicts"] == {name: {"count": 1, "examples": _keys(table, [12])}}
    assert result["rounding_differences"][name]["count"] == 3
    assert list(result["rounding_differences"]) == [name]
    merged = pl.read_parquet(data_file(root / "final", SPLIT, name))
    assert np.array_equal(_vectors(merged.to_arrow()), before)  # chunk 0's vectors were kept


@pytest.mark.parametrize("case", ["float16", "bf16-model"])
def test_the_tolerance_follows_the_vectors_precision(tmp_path_factory, tmp_path, case):
    """float16 vectors (capture.vector_dtype) and float32 vectors of a model run in bf16: one or two ulps of the
    row's largest element are rounding differences, 5% is a conflict."""
    sections = ({"capture": {"vector_dtype": "float16"}} if case == "float16" else {"model": {"dtype": "bfloat16"}})
    src = _staged(tmp_path_factory, case, dataset={"max_samples": 6}, **sections)
    root, cfg = _copy(tmp_path, src, dataset={"max_samples": 6}, **sections)
    merge_staging(cfg)
    before_final = _final_state(root)
    name = "l00h00k"
    v0 = _vectors(pq.read_table(_staged_file(root, name)))
    if case == "float16":
        assert v0.dtype == np.float16
    else:
        assert v0.dtype == np.float32 and not (v0.view(np.uint32) & 0xFFFF).any()  # bf16 values in float32

    def ulps(v: np.ndarray, rows, steps) -> None:
        for r, k in zip(rows, steps):
            j = int(np.argmax(np.abs(v[r])))
            if v.dtype == np.float16:
                v[r, j] = v.dtype.type(np.nextafter(v[r, j], np.copysign(np.inf, v[r, j]), dtype=np.float16)
                                       if k == 1 else v[r, j] + np.sign(v[r, j]) * 2 * np.spacing(np.abs(v[r, j])))
            else:  # k bfloat16 ulps away from zero: the float32's top 16 bits step by k
                v[r, j] = (v[r, j:j + 1].view(np.uint32) + np.uint32(k << 16)).view(np.float32)[0]

    def change(v):
        ulps(v, [0, 3, 6], [1, 2, 1])
        _nudge_largest(v, [9], [5e-2])

    before, after, table = _rewrite_vectors(_staged_file(root, name), change)
    realized = _relative(after[[0, 3, 6]].astype(np.float32), before[[0, 3, 6]].astype(np.float32))
    tol = ROUNDING_RTOL["float16" if case == "float16" else "bfloat16"]
    assert realized.min() > ROUNDING_RTOL["float32"] and realized.max() <= tol  # beyond float32's, within this one
    result = merge_staging(cfg)
    assert result["conflicts"] == {name: {"count": 1, "examples": _keys(table, [9])}}
    assert result["rounding_differences"] == {
        name: {"count": 3, "max_relative_difference": pytest.approx(realized.max(), rel=1e-6)}}
    assert _final_state(root) == before_final


def test_compare_vectors_rule():
    """The rule on arrays: equal, within and beyond the tolerance per precision, NaN and inf."""
    rng = np.random.default_rng(0)
    kept = rng.standard_normal((8, 64)).astype(np.float32)
    staged = kept.copy()
    big = np.abs(kept).max(axis=1)
    staged[1, 0] += 9e-6 * big[1]        # within float32's 1e-5
    staged[2, 0] += 2e-5 * big[2]        # beyond it
    staged[3, 0] = np.nan                # NaN facing a number
    kept[4, 0] = staged[4, 0] = np.nan   # NaN facing NaN, the rest equal
    staged[5, 1] += 1e-6 * big[5]
    kept[5, 0] = staged[5, 0] = np.nan   # NaN facing NaN, a rounding difference elsewhere
    staged[6] = -kept[6]                 # another vector
    kept[7, 0] = staged[7, 0] = -0.0
    kind, rel = compare_vectors(staged, kept)
    assert kind.tolist() == [SAME, ROUNDING, CONFLICT, CONFLICT, SAME, ROUNDING, CONFLICT, SAME]
    assert rel[0] == rel[4] == rel[7] == 0 and 8e-6 < rel[1] <= 1e-5 and rel[2] > 1e-5
    # bf16 values: two bf16 ulps of the largest element are rounding, 5% is not
    bf = (kept.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    moved = bf.copy()
    j = np.argmax(np.abs(bf), axis=1)
    moved[0, j[0]] = (bf[0, j[0]:j[0] + 1].view(np.uint32) + np.uint32(2 << 16)).view(np.float32)[0]
    moved[1, j[1]] *= 1.05
    assert compare_vectors(moved[:2], bf[:2])[0].tolist() == [ROUNDING, CONFLICT]
    # the same two ulps on float32 values are a conflict
    moved32 = kept.copy()
    moved32[0, j[0]] *= 1 + 2 ** -7
    assert compare_vectors(moved32[:1], kept[:1])[0].tolist() == [CONFLICT]
    # float16 rows: one ulp is rounding, 1% is not
    h = kept.astype(np.float16)
    hm = h.copy()
    hm[0, j[0]] = np.nextafter(h[0, j[0]], np.float16(np.inf) * np.sign(h[0, j[0]]), dtype=np.float16)
    hm[1, j[1]] *= np.float16(1.01)
    assert compare_vectors(hm[:2], h[:2])[0].tolist() == [ROUNDING, CONFLICT]
    # many rows: the blocks give what one block gives
    many_k = np.repeat(kept, 10000, axis=0)
    many_s = np.repeat(staged, 10000, axis=0)
    k2, r2 = compare_vectors(many_s, many_k)
    assert np.array_equal(k2, np.repeat(kind, 10000)) and np.allclose(r2, np.repeat(rel, 10000), equal_nan=True)


def test_two_batch_sizes_give_rounding_differences_only(tmp_path):
    """The same examples run by two real chunk runs in batches of 8 and of 3, merged into one final/: no conflict;
    every row whose vector differs is a rounding difference."""
    first = tmp_path / "bs8"
    cfg8 = _stage(first, dataset={"max_samples": 24}, inference={"batch_size": 8})
    merge_staging(cfg8)
    before_final = _final_state(first)
    other = tmp_path / "bs3"
    _stage(other, dataset={"max_samples": 24}, inference={"batch_size": 3})
    shutil.rmtree(first / "staging")
    shutil.copytree(other / "staging", first / "staging")
    result = merge_staging(cfg8)  # batch size is not in the chunk fingerprint: the staged chunk is not stale
    # what differs, counted here independently of qk_sniffer.merge
    differing, rows, top = {}, 0, 0.0
    for path in sorted((first / "final" / "data" / SPLIT).glob("*/data.parquet")):
        name = path.parent.name
        a, b = pq.read_table(path), pq.read_table(_staged_file(first, name))
        assert a.select(KEYS).equals(b.select(KEYS)) and a.drop(["vector"]).equals(b.drop(["vector"]))
        rel = _relative(_vectors(b), _vectors(a))
        rows += len(rel)
        if rel.max() > 0:
            differing[name] = int(np.count_nonzero(rel))
            top = max(top, float(rel.max()))
    print(f"batch sizes 8 and 3: {sum(differing.values())} of {rows} rows differ, in {len(differing)} configs, "
          f"at most {top:.3g} relative")  # shown with pytest -s
    assert top <= ROUNDING_RTOL["float32"]
    assert result["conflicts"] == {} and result["conflicts_total"] == 0
    assert {n: r["count"] for n, r in result["rounding_differences"].items()} == differing
    assert result["rounding_max_relative_difference"] == pytest.approx(top, rel=1e-6)
    assert result["rows_added_total"] == 0 and _final_state(first) == before_final
