"""sniff-chunk end to end (in process): staged Parquet files, manifests, invariances, filters, errors."""

from __future__ import annotations

import hashlib
import json
import time
from types import SimpleNamespace

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from qk_sniffer.chunk.run import run_chunk
from qk_sniffer.config import ConfigError
from qk_sniffer.layout import chunk_dir, manifest_path
from qk_sniffer.sampling import SHARED_HEAD, SamplerSpec, bucket_of, keep_probability, token_u

from .support.tiny_data import write_corpus


def staged(root, split="tiny") -> dict[str, pl.DataFrame]:
    """config -> rows of every staged chunk, sorted by key."""
    out: dict[str, list] = {}
    for f in sorted(root.glob(f"staging/chunk-*/data/{split}/*/data.parquet")):
        out.setdefault(f.parent.name, []).append(pl.read_parquet(f))
    return {k: pl.concat(v).sort(["example_id", "position"]) for k, v in out.items()}


def run_all(cfg):
    return [run_chunk(cfg, i) for i in range(cfg["workflow"]["num_chunks"])]


def test_chunk_writes_complete_files_and_manifest_last(make_config):
    cfg = make_config()
    m = run_chunk(cfg, 0)
    root = cfg["output"]["data_root"]
    from pathlib import Path

    root = Path(root)
    man = json.loads(manifest_path(root, 0).read_text())
    assert man == json.loads(json.dumps(m, default=str))
    assert man["examples"] + man["skipped_empty"] + man["skipped_invalid"] == 40
    assert man["example_range"] == [0, 40]
    # 4 layers x (4 query + 2 key heads)
    assert len(man["rows"]) == 4 * 6 and all(v > 0 for v in man["rows"].values())
    files = sorted(p.relative_to(chunk_dir(root, 0)).as_posix() for p in chunk_dir(root, 0).rglob("*") if p.is_file())
    assert "manifest.json" in files and not [f for f in files if "tmp" in f]
    t = pq.read_table(chunk_dir(root, 0) / "data/tiny/l01h03q/data.parquet")
    assert t.schema.names == ["bucket", "example_id", "position", "vector", "sliding_window", "layer", "head", "kind"]
    assert str(t.schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    assert t.num_rows == man["rows"]["l01h03q"]
    assert set(t.column("layer").to_pylist()) == {1} and set(t.column("head").to_pylist()) == {3}
    assert set(t.column("kind").to_pylist()) == {"q"}
    meta = pq.ParquetFile(chunk_dir(root, 0) / "data/tiny/l01h03q/data.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    # sorted by key and marked so, as final files are: the merge appends such files byte for byte
    assert [c.column_index for c in meta.row_group(0).sorting_columns] == [1, 2]
    keys = list(zip(t.column("example_id").to_pylist(), t.column("position").to_pylist()))
    assert keys == sorted(set(keys))
    # every listed file holds the rows the manifest records for it, sorted by key
    assert set(man["files"]) == {n for n, c in man["rows"].items() if c > 0} and "summaries" not in man
    for name, rel in man["files"].items():
        t = pq.read_table(chunk_dir(root, 0) / rel)
        keys = list(zip(t.column("example_id").to_pylist(), t.column("position").to_pylist()))
        assert t.num_rows == man["rows"][name] and keys == sorted(set(keys))


def test_sampled_keys_equal_spec(make_config):
    """The (example_id, position) set of each config is exactly what the frozen function selects."""
    from transformers import AutoTokenizer

    cfg = make_config(dataset={"max_samples": 12})
    run_chunk(cfg, 0)
    from pathlib import Path

    got = staged(Path(cfg["output"]["data_root"]))
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name"])
    texts = [json.loads(line)["text"] for line in open(cfg["dataset"]["data_files"])][:12]
    spec = SamplerSpec.from_config(cfg)
    for name, layer, kind in [("l00h00q", 0, 0), ("l02h01k", 2, 1), ("l03h03q", 3, 0)]:
        expect = set()
        for eid, text in enumerate(texts):
            if not text.strip():
                continue
            n = len(tok(text, truncation=True, max_length=96)["input_ids"])
            pos = np.arange(n)
            p = keep_probability(bucket_of(pos, spec.type, spec.min_bucket_size), spec.type, spec.base_rate, spec.min_bucket_size)
            expect |= {(eid, int(i)) for i in pos if token_u(spec.seed, eid, layer, SHARED_HEAD, kind, int(i)) < p[i]}
        df = got[name]
        assert set(zip(df["example_id"].to_list(), df["position"].to_list())) == expect
        assert df["bucket"].to_list() == bucket_of(df["position"].to_numpy(), spec.type, spec.min_bucket_size).tolist()


def _vectors_equal(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        assert x.select(["example_id", "position", "bucket", "layer", "head", "kind"]).equals(
            y.select(["example_id", "position", "bucket", "layer", "head", "kind"])
        ), name
        vx, vy = np.stack(x["vector"].to_numpy()), np.stack(y["vector"].to_numpy())
        assert np.abs(vx - vy).max() <= atol, name


def test_identical_output_for_batch_sizes_chunks_and_padding_side(tmp_path):
    from .support.tiny_data import base_config

    runs = {}
    for label, batch, chunks, side in [("b1", 1, 1, "right"), ("b3", 3, 1, "right"), ("b8", 8, 4, "left"),
                                       ("c4", 3, 4, "right")]:
        cfg = base_config(tmp_path / label, inference={"batch_size": batch}, tokenizer={"padding": side},
                          workflow={"num_chunks": chunks}, dataset={"max_samples": 24})
        run_all(cfg)
        runs[label] = staged(tmp_path / label)
    # same keys exactly; vectors equal up to float32 reduction-order noise of differently shaped batches
    for label in ("b3", "b8", "c4"):
        _vectors_equal(runs["b1"], runs[label], atol=1e-5)


def test_layer_head_filters_and_gqa_key_heads(make_config):
    from pathlib import Path

    cfg = make_config(capture={"layers": [-1, 1], "heads": [3]})
    run_chunk(cfg, 0)
    names = set(staged(Path(cfg["output"]["data_root"])))
    # query head 3 reads key/value head 1 (4 query heads share 2 kv heads)
    assert names == {"l01h03q", "l01h01k", "l03h03q", "l03h01k"}


def test_full_attention_only_float16_and_all_sampler(tiny_models, make_config):
    from pathlib import Path

    cfg = make_config(
        model={"name": str(tiny_models("gemma3"))},
        capture={"full_attention_only": True, "vector_dtype": "float16", "capture_keys": False,
                 "sampler": {"type": "all"}},
        dataset={"max_samples": 6},
    )
    man = run_chunk(cfg, 0)
    got = staged(Path(cfg["output"]["data_root"]))
    assert {n[:3] for n in got} == {"l01", "l03"} and all(n.endswith("q") for n in got)
    t = pq.read_table(next(Path(cfg["output"]["data_root"]).glob("staging/chunk-0/data/tiny/l01h00q/data.parquet")))
    assert str(t.schema.field("vector").type) == "fixed_size_list<element: halffloat>[16]"
    assert t.column("sliding_window").null_count == t.num_rows
    assert got["l01h00q"].height == man["tokens"]  # the all sampler keeps every token
    assert man["model"]["layer_windows"] == [4, None, 4, None]


def test_sliding_window_column_and_per_head(tiny_models, make_config):
    from pathlib import Path

    cfg = make_config(model={"name": str(tiny_models("gemma3"))}, capture={"sampler": {"per_head": True}},
                      dataset={"max_samples": 8})
    run_chunk(cfg, 0)
    got = staged(Path(cfg["output"]["data_root"]))
    assert set(got["l00h00q"]["sliding_window"].to_list()) == {4}
    assert got["l01h00q"]["sliding_window"].null_count() == got["l01h00q"].height
    a = set(zip(got["l00h00q"]["example_id"], got["l00h00q"]["position"]))
    b = set(zip(got["l00h01q"]["example_id"], got["l00h01q"]["position"]))
    assert a != b  # per-head sampling draws different positions per head


def test_token_strings(make_config):
    from pathlib import Path

    from transformers import AutoTokenizer

    cfg = make_config(capture={"capture_token_strings": True, "sampler": {"type": "all"}}, dataset={"max_samples": 3})
    run_chunk(cfg, 0)
    df = staged(Path(cfg["output"]["data_root"]))["l00h00q"]
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name"])
    text = json.loads(open(cfg["dataset"]["data_files"]).readline())["text"]
    ids = tok(text, truncation=True, max_length=96)["input_ids"]
    first = df.filter(pl.col("example_id") == 0).sort("position")
    assert first["token_str"].to_list() == [tok.decode([i]) for i in ids]


def test_empty_texts_skipped_and_counted_and_string_ids(tmp_path):
    from .support.tiny_data import base_config

    corpus = write_corpus(tmp_path / "c.jsonl", ["hello world", "", "   ", "another text here", "last"])
    cfg = base_config(tmp_path / "root", corpus=corpus, dataset={"id_column": "doc_id", "max_samples": None},
                      capture={"sampler": {"type": "all"}})
    man = run_chunk(cfg, 0)
    assert man["examples"] == 3 and man["skipped_empty"] == 2

    got = staged(tmp_path / "root")["l00h00q"]
    # string ids are blake2b-8 of the text, little-endian signed (the original tool's ids)
    want = {int.from_bytes(hashlib.blake2b(f"doc-{i:05d}".encode(), digest_size=8).digest(), "little", signed=True)
            for i in (0, 3, 4)}
    assert set(got["example_id"].to_list()) == want


def test_more_chunks_than_examples_gives_empty_recorded_chunks(tmp_path):
    from .support.tiny_data import base_config

    corpus = write_corpus(tmp_path / "c.jsonl", ["one text", "two texts"])
    cfg = base_config(tmp_path / "root", corpus=corpus, dataset={"max_samples": None}, workflow={"num_chunks": 4})
    mans = run_all(cfg)
    assert [m["example_range"] for m in mans] == [[0, 0], [0, 1], [1, 1], [1, 2]]
    assert [m["examples"] for m in mans] == [0, 1, 0, 1]
    assert all(manifest_path(tmp_path / "root", i).is_file() for i in range(4))


def test_rerun_replaces_a_partial_chunk(make_config):
    from pathlib import Path

    cfg = make_config(dataset={"max_samples": 6})
    root = Path(cfg["output"]["data_root"])
    stray = chunk_dir(root, 0) / "data/tiny/l00h00q/.data.parquet.tmp-1"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half a file")
    run_chunk(cfg, 0)
    assert not stray.exists() and manifest_path(root, 0).is_file()


def test_failed_write_leaves_no_manifest(make_config, monkeypatch):
    """A write error (e.g. disk full) fails the chunk: no manifest, no file under its final name."""
    from pathlib import Path

    import qk_sniffer.chunk.writer as writer

    cfg = make_config(dataset={"max_samples": 6})
    root = Path(cfg["output"]["data_root"])

    def boom(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer.pq.ParquetWriter, "write_table", boom)
    with pytest.raises(RuntimeError, match="No space left"):
        run_chunk(cfg, 0)
    assert not manifest_path(root, 0).exists()
    assert not list(root.glob("staging/chunk-0/**/data.parquet"))


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"capture": {"heads": [9]}}, r"capture.heads: head 9 is out of range; the model has 4 query heads"),
        ({"capture": {"layers": [4]}}, r"capture.layers: layer 4 is out of range; the model has 4 layers"),
        ({"dataset": {"text_column": "body"}}, r"dataset.text_column: column 'body' is not in 'json' \(columns: doc_id, text\)"),
        ({"dataset": {"split": "validation"}}, r"dataset.split: 'validation'"),
        ({"model": {"name": "./no/such/model"}}, r"model.name: './no/such/model' looks like a local path but does not exist"),
    ],
)
def test_clear_errors(make_config, sections, match):
    cfg = make_config(**sections)
    with pytest.raises(ConfigError, match=match):
        run_chunk(cfg, 0)


def test_empty_dataset_is_an_error(tmp_path):
    from .support.tiny_data import base_config

    corpus = write_corpus(tmp_path / "empty.jsonl", [])
    cfg = base_config(tmp_path / "root", corpus=corpus, dataset={"max_samples": None})
    with pytest.raises(ConfigError, match=r"has no rows"):
        run_chunk(cfg, 0)
    assert not (tmp_path / "root" / "staging" / "chunk-0" / "manifest.json").exists()


def test_non_utf8_rows_in_a_binary_column_are_skipped_and_counted(tmp_path):
    import pyarrow as pa

    from .support.tiny_data import base_config

    texts = [b"valid text one", b"\xff\xfe broken \xc3", "caf\u00e9 ok".encode(), b"", None]
    pq.write_table(pa.table({"text": pa.array(texts, pa.binary())}), tmp_path / "bin.parquet")
    cfg = base_config(tmp_path / "root", dataset={"path": "parquet", "data_files": str(tmp_path / "bin.parquet"),
                                                  "max_samples": None}, capture={"sampler": {"type": "all"}})
    man = run_chunk(cfg, 0)
    assert (man["examples"], man["skipped_empty"], man["skipped_invalid"]) == (2, 1, 2)
    assert set(staged(tmp_path / "root")["l00h00q"]["example_id"].to_list()) == {0, 2}


def test_non_utf8_text_file_is_a_clear_error(tmp_path):
    from .support.tiny_data import base_config

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\n\xff\xfe not utf-8\n")
    cfg = base_config(tmp_path / "root", dataset={"path": "text", "data_files": str(bad), "max_samples": None})
    with pytest.raises(ConfigError, match=r"is not valid UTF-8.*re-encode the file"):
        run_chunk(cfg, 0)
    assert not (tmp_path / "root" / "staging" / "chunk-0" / "manifest.json").exists()


class _SlowBatch:
    """What the writer thread takes from sniff-chunk: one config's rows, ready after ``delay`` seconds."""

    def __init__(self, first_example: int, delay: float, rows: int = 50, dim: int = 8):
        import torch

        rng = np.random.default_rng(first_example)
        self.delay, self.token_ids = delay, None
        plan = SimpleNamespace(size=rows, per_head=False, heads=[0], bucket=np.zeros(rows, np.int64),
                               example_id=np.full(rows, first_example, np.int64),
                               position=np.arange(rows, dtype=np.int64))
        self.items = [(0, "q", plan, torch.as_tensor(rng.standard_normal((rows, 1, dim), dtype=np.float32)), None)]

    def wait(self):
        time.sleep(self.delay)


def test_an_aborted_writer_writes_nothing_after_it_returns(tmp_path):
    """A killed chunk aborts its writer; the rerun deletes the directory at once, so the writer thread must have
    stopped by then (it used to finish its queue and flush into the directory being deleted)."""
    from qk_sniffer.chunk.writer import ChunkWriter

    writer = ChunkWriter(tmp_path / "seg", "tiny", head_dim=8, n_layers=1, n_heads=1, buffer_bytes=0, max_queue=4)
    for i in range(4):  # every batch would flush a file (buffer_bytes=0)
        writer.put(_SlowBatch(i, delay=0.2))
    writer.abort()
    assert not writer._thread.is_alive()
    left = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert left == []
    time.sleep(0.5)  # nothing turns up later either
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == []
    # the same batches through a writer that is closed give a file: the batches are real
    other = ChunkWriter(tmp_path / "ok", "tiny", head_dim=8, n_layers=1, n_heads=1, buffer_bytes=0)
    for i in range(2):
        other.put(_SlowBatch(i, delay=0.0))
    assert other.close() == {"l00h00q": 100}
    t = pq.read_table(tmp_path / "ok" / "data" / "tiny" / "l00h00q" / "data.parquet")
    assert t.num_rows == 100 and t.column("example_id").to_pylist() == [0] * 50 + [1] * 50


def test_batches_keep_padding_small_at_long_contexts():
    """Rows far shorter than a batch's longest start their own batch; short rows batch freely; a pure function."""
    from qk_sniffer.chunk.source import PADDING_SLACK_TOKENS, length_sorted_batches

    lengths = np.array([65536, 49152, 60000, 300, 20, 900, 8192, 7000, 6500])
    batches = length_sorted_batches(lengths, 4)
    assert sorted(int(i) for b in batches for i in b) == list(range(len(lengths)))
    assert [sorted(lengths[b].tolist(), reverse=True) for b in batches] == [
        [65536, 60000], [49152], [8192], [7000, 6500], [900, 300, 20]]
    for b in batches:
        longest = lengths[b].max()
        assert len(b) <= 4 and all(longest - n <= max(PADDING_SLACK_TOKENS, longest // 8) for n in lengths[b])
    # the tail after any batch boundary batches exactly as in the full run (what a resumed chunk relies on)
    order = np.concatenate(batches)
    for k in range(1, len(batches)):
        tail = order[sum(len(b) for b in batches[:k]):]
        assert [tail[b].tolist() for b in length_sorted_batches(lengths[tail], 4)] == [b.tolist() for b in batches[k:]]
