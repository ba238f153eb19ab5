"""What the original format's keys mean, each checked against a computation written here: head sampling, example
ids of an id column, streaming, and the row cap."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qk_sniffer.config import ConfigError

from .support.tiny_data import base_config, build_final, stage_chunks

M64 = (1 << 64) - 1


# -- head sampling ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma3(tiny_models):
    """A tiny Gemma 3: layers 0 and 2 slide, 1 and 3 are full; 4 query heads read 2 key/value heads."""
    from qk_sniffer.modeling import load_model

    path = tiny_models("gemma3")
    model = load_model(base_config(path / "unused", model_dir=path), torch.device("cpu"))
    return path, model, json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("capture", [
    {"head_sampling": {"count": 5}},
    {"head_sampling": {"count": 3, "seed": 11}, "full_attention_only": True},
    {"head_sampling": {"count": 4, "seed": 2}, "layers": [3, 0, -2], "heads": [3, 1]},
    {"head_sampling": {"count": 99, "seed": 5}, "layers": [1], "capture_queries": False},
])
def test_head_sampling_picks_the_original_heads(tmp_path, gemma3, capture):
    from qk_sniffer.modeling import resolve_capture

    path, model, conf = gemma3
    cfg = base_config(tmp_path, model_dir=path, capture=capture)
    spec = resolve_capture(cfg, model)
    # the original: layer-major, head-minor candidates after the filters, then random.Random(seed).sample
    n_layers, n_q, n_kv = conf["num_hidden_layers"], conf["num_attention_heads"], conf["num_key_value_heads"]
    layers = sorted({v % n_layers for v in capture.get("layers", range(n_layers))})
    if capture.get("full_attention_only"):
        layers = [i for i in layers if conf["layer_types"][i] == "full_attention"]
    heads = sorted(capture.get("heads", range(n_q)))
    candidates = [(layer, head) for layer in layers for head in heads]
    hs = capture["head_sampling"]
    picked = random.Random(hs.get("seed", 0)).sample(candidates, min(hs["count"], len(candidates)))
    want_q = {(layer, head) for layer, head in picked}
    want_k = {(layer, head // (n_q // n_kv)) for layer, head in picked}
    got_q = {(layer, h) for layer in spec.layers for h in spec.heads_for("q", layer)}
    got_k = {(layer, h) for layer in spec.layers for h in spec.heads_for("k", layer)}
    assert got_q == want_q and got_k == want_k
    assert spec.kinds == (("k",) if capture.get("capture_queries") is False else ("q", "k"))
    assert spec.layers == sorted({layer for layer, _ in picked})
    rec = spec.head_sampling
    assert (rec["seed"], rec["requested"], rec["candidates"], rec["selected"]) == \
        (hs.get("seed", 0), hs["count"], len(candidates), len(picked))
    assert rec["query_heads"] == sorted([list(p) for p in picked])
    assert rec["key_heads"] == sorted([list(p) for p in want_k])


def test_head_sampling_without_candidates_is_a_config_error(tmp_path, gemma3):
    from qk_sniffer.modeling import resolve_capture

    path, model, _ = gemma3
    cfg = base_config(tmp_path, model_dir=path, capture={"head_sampling": {"count": 2}, "heads": []})
    with pytest.raises(ConfigError, match=r"^capture.head_sampling: no \(layer, query head\) pair is left to sample "
                                          r"from after capture.layers, capture.heads and capture.full_attention_only"):
        resolve_capture(cfg, model)
    cfg = base_config(tmp_path, model_dir=path, capture={"head_sampling": {"count": 2}, "layers": []})
    with pytest.raises(ConfigError, match=r"^capture.layers: the list is empty"):
        resolve_capture(cfg, model)


# -- example ids ------------------------------------------------------------------------------


def original_id(value) -> int:
    """The original tool's id of one value, written out independently of qk_sniffer."""
    if type(value) is bool:
        return 1 if value else 0
    if type(value) is int and -(2**63) <= value <= 2**63 - 1:
        return value
    if type(value) is float and value == value and value not in (float("inf"), float("-inf")) \
            and value == int(value) and -(2**63) <= int(value) <= 2**63 - 1:
        return int(value)
    return struct.unpack("<q", hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest())[0]


VALUES = [True, False, 0, 7, -3, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 3.0, -2.0, 2.5, 1e300, float("nan"),
          float("inf"), "doc-00001", "7", "", "é", None]


def test_example_ids_map_as_the_original(tmp_path):
    from qk_sniffer.chunk.source import example_id_of

    assert [example_id_of(v) for v in VALUES] == [original_id(v) for v in VALUES]


def _parquet_source(tmp_path, n: int = 50, files: int = 3):
    """A local Parquet dataset in several files, with id columns of every type Arrow stores."""
    folder = tmp_path / "src"
    folder.mkdir()
    rows = [{"text": f"text number {i} " + "word " * (i % 7), "int_id": 1000 + i, "float_id": float(i) + (i % 2) * 0.5,
             "bool_id": i % 2 == 0, "str_id": f"doc-{i:05d}"} for i in range(n)]
    step = -(-n // files)
    for f in range(files):
        pq.write_table(pa.Table.from_pylist(rows[f * step:(f + 1) * step]), folder / f"part-{f}.parquet")
    return folder, rows


@pytest.mark.parametrize("column", ["int_id", "float_id", "bool_id", "str_id"])
def test_id_columns_of_a_real_dataset(tmp_path, column):
    from qk_sniffer.chunk.source import load_shard

    folder, rows = _parquet_source(tmp_path)
    for streaming in (False, True):
        cfg = base_config(tmp_path / "root", dataset={"path": str(folder), "data_files": None, "max_samples": None,
                                                      "id_column": column, "streaming": streaming})
        shard = load_shard(cfg, 0, 0, None)
        assert shard.example_ids.tolist() == [original_id(r[column]) for r in rows]


# -- streaming --------------------------------------------------------------------------------


def test_streaming_reads_the_same_disjoint_chunks_without_preparing_the_dataset(tmp_path, monkeypatch):
    import datasets

    from qk_sniffer.chunk.plan import decide
    from qk_sniffer.chunk.source import count_examples, load_shard

    folder, rows = _parquet_source(tmp_path, n=47)
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)

    def shards(streaming: bool, num_chunks: int, max_samples):
        cfg = base_config(tmp_path / "root", dataset={"path": str(folder), "data_files": None, "id_column": "str_id",
                                                      "max_samples": max_samples, "streaming": streaming},
                          workflow={"num_chunks": num_chunks})
        specs = decide(cfg, tmp_path / "root", count_examples(cfg)).specs
        return [load_shard(cfg, s.chunk, s.start, s.stop) for s in specs]

    streamed = shards(True, 4, 40)
    assert not list(cache.rglob("*.arrow"))  # nothing was prepared on disk
    assert [(s.start, s.stop, s.total) for s in streamed] == [(0, 10, 40), (10, 20, 40), (20, 30, 40), (30, 40, 40)]
    texts = [t for s in streamed for t in s.texts]
    assert texts == [r["text"] for r in rows[:40]]  # disjoint, in order, covering the first 40 rows
    again = shards(True, 4, 40)
    assert [s.texts for s in again] == [s.texts for s in streamed]
    # a stream of unknown length: one chunk reads it all; several cannot be divided
    whole = shards(True, 1, None)[0]
    assert (whole.start, whole.stop, whole.total, len(whole.texts)) == (0, 47, 47, 47)
    with pytest.raises(ConfigError, match=r"^dataset.streaming: the length of .* set dataset.max_samples"):
        shards(True, 2, None)
    assert not list(cache.rglob("*.arrow"))
    prepared = shards(False, 4, 40)
    assert list(cache.rglob("*.arrow"))  # the same check sees a prepared dataset
    for a, b in zip(streamed, prepared):
        assert (a.start, a.stop, a.total, a.texts) == (b.start, b.stop, b.total, b.texts)
        assert a.example_ids.tolist() == b.example_ids.tolist()


# -- the row cap ------------------------------------------------------------------------------


def _mix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def cap_rank(seed: int, example_id: int, layer: int, head: int, kind: int, position: int) -> int:
    """config/README.md's rank: mix(mix(prefix ^ position) ^ ASCII 'max_rows')."""
    h = _mix(seed & M64)
    for v in (example_id, layer, head, kind):
        h = _mix(h ^ (v & M64))
    return _mix(_mix(h ^ position) ^ int.from_bytes(b"max_rows", "big"))


def _rows(root) -> dict[str, pl.DataFrame]:
    out: dict[str, list] = {}
    for f in sorted(root.glob("staging/chunk-*/data/tiny/*/data.parquet")):
        out.setdefault(f.parent.name, []).append(pl.read_parquet(f, columns=["example_id", "position", "layer", "head"]))
    return {k: pl.concat(v).sort(["example_id", "position"]) for k, v in out.items()}


def test_max_rows_per_batch_is_a_pure_function_of_the_keys(tmp_path):
    from qk_sniffer.merge import MergeError, merge_staging

    common = {"capture": {"layers": [0, 2], "sampler": {"base_rate": 4.0, "seed": 3}}}
    stage_chunks(tmp_path / "full", **common)
    cap = 3
    capped = {"capture": {**common["capture"], "max_rows_per_batch": cap}}
    build_final(tmp_path / "a", **capped)
    stage_chunks(tmp_path / "b", inference={"batch_size": 1}, workflow={"num_chunks": 3}, **capped)
    full, a, b = (_rows(tmp_path / x) for x in ("full", "a", "b"))
    assert set(a) == set(b) == set(full)
    for name, frame in full.items():
        assert a[name].equals(b[name]), name  # batch size and chunking change nothing
        kind = 0 if name.endswith("q") else 1
        want = []
        for (eid,), group in frame.group_by(["example_id"], maintain_order=True):
            ranked = sorted(group.iter_rows(named=True),
                            key=lambda r: cap_rank(3, eid, r["layer"], M64, kind, r["position"]))
            want += [(eid, r["position"]) for r in ranked[:cap]]
        assert sorted(a[name].select(["example_id", "position"]).iter_rows()) == sorted(want), name
        assert a[name].group_by("example_id").len()["len"].max() <= cap
        assert frame.group_by("example_id").len()["len"].max() > cap  # the cap did remove rows
    # the cap is a sampling setting of the split: appending with another cap is refused unless allowed
    shutil.rmtree(tmp_path / "a" / "staging")
    other = {"capture": {**common["capture"], "max_rows_per_batch": 5}}
    cfg = stage_chunks(tmp_path / "a", **other)
    with pytest.raises(MergeError, match=r"max_rows_per_batch: recorded 3, this run 5.*allow_mixed_sampling"):
        merge_staging(cfg)
