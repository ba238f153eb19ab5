"""The preflight's checks of the source (qk_sniffer.source_check) and the model (qk_sniffer.model_check).

Real datasets written to disk (json, jsonl, parquet, csv) and real tiny checkpoints (tests/conftest.py). Every
refusal is one line naming the config key; every refusal test also proves nothing was written under the data root.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qk_sniffer.chunk import source
from qk_sniffer.config import ConfigError
from qk_sniffer.model_check import ModelInfo, check_model
from qk_sniffer.source_check import SourceInfo, check_source

from .support.tiny_data import CORPUS, TINY_LLAMA, base_config


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _texts(n):
    return [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()[:n]]


@pytest.fixture
def root(tmp_path):
    return tmp_path / "root"


def _config(root, path="json", files=None, **dataset):
    files = files if isinstance(files, dict) else str(files)
    return base_config(root, dataset={"path": path, "data_files": files, "max_samples": None, **dataset})


def _refused(call, cfg, root, *words) -> str:
    with pytest.raises(ConfigError) as err:
        call(cfg)
    msg = str(err.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in: {msg}"
    assert not root.exists(), "a refused preflight wrote under the data root"
    return msg


# -- the source ------------------------------------------------------------------------------------------------


def test_happy_source_counts_rows_after_max_samples(tmp_path, root):
    rows = [{"doc_id": f"doc-{i}", "text": t} for i, t in enumerate(_texts(30))]
    files = _jsonl(tmp_path / "c.jsonl", rows)
    info = check_source(_config(root, files=files, id_column="doc_id"))
    assert info == SourceInfo(rows=30, split_rows=30, columns=["doc_id", "text"], text_type="string", id_type="string",
                              streaming=False, ids_checked=30)
    info = check_source(_config(root, files=files, id_column="doc_id", max_samples=12))
    assert (info.rows, info.split_rows, info.ids_checked) == (12, 30, 12)
    pq.write_table(pa.table({"text": pa.array([t.encode() for t in _texts(5)], pa.binary()),
                             "n": pa.array(range(5), pa.int32())}), tmp_path / "b.parquet")
    info = check_source(_config(root, "parquet", tmp_path / "b.parquet", id_column="n"))
    assert (info.rows, info.text_type, info.id_type) == (5, "binary", "int32")
    (tmp_path / "c.csv").write_text("id,text\n1,one\n2,two\n3,three\n", encoding="utf-8")
    assert check_source(_config(root, "csv", tmp_path / "c.csv", id_column="id")).rows == 3
    assert not root.exists()


def test_repeated_id_is_refused_with_the_value_and_rows(tmp_path, root):
    rows = [{"doc_id": f"doc-{i % 7}", "text": t} for i, t in enumerate(_texts(20))]
    files = _jsonl(tmp_path / "c.jsonl", rows)
    msg = _refused(check_source, _config(root, files=files, id_column="doc_id"), root, "dataset.id_column", "'doc_id'",
                   "id 'doc-0' is repeated in rows 0, 7, 14", "7 repeated id(s)", "13 row(s) too many",
                   "pick another id column", "deduplicate the source", "remove dataset.id_column")
    assert "20 rows the run reads" in msg
    # only the rows the run reads count: the first 7 are unique
    assert check_source(_config(root, files=files, id_column="doc_id", max_samples=7)).rows == 7


def test_repeated_integer_ids_in_parquet(tmp_path, root):
    pq.write_table(pa.table({"text": _texts(8), "id": pa.array([5, 1, 2, 3, 4, 5, 6, 5], pa.int64())}),
                   tmp_path / "x.parquet")
    _refused(check_source, _config(root, "parquet", tmp_path / "x.parquet", id_column="id"), root,
             "dataset.id_column", "id 5 is repeated in rows 0, 5, 7", "1 repeated id(s), 2 row(s) too many")


def test_ids_that_map_to_one_example_id_are_refused_with_both_values(tmp_path, root, monkeypatch):
    files = _jsonl(tmp_path / "c.jsonl", [{"id": f"k{i}", "text": t} for i, t in enumerate(_texts(4))])
    real = source.example_id_of
    monkeypatch.setattr(source, "example_id_of", lambda v: 42 if v in ("k1", "k3") else real(v))  # a collision
    _refused(check_source, _config(root, files=files, id_column="id"), root,
             "dataset.id_column", "the values 'k1', 'k3' map to one example id (42)", "rows 1, 3")


def test_null_ids_are_refused_with_count_and_rows(tmp_path, root):
    rows = [{"id": None if i in (2, 5, 9) else i, "text": t} for i, t in enumerate(_texts(12))]
    _refused(check_source, _config(root, files=_jsonl(tmp_path / "c.jsonl", rows), id_column="id"), root,
             "dataset.id_column", "'id'", "3 null value(s)", "rows 2, 5, 9", "remove dataset.id_column")


def test_mixed_type_ids_are_refused_with_an_example_of_each(tmp_path, root):
    rows = [{"id": 7, "text": "a"}, {"id": 8, "text": "b"}, {"id": "x9", "text": "c"}]
    _refused(check_source, _config(root, files=_jsonl(tmp_path / "c.jsonl", rows), id_column="id"), root,
             "dataset.id_column", "mixes value types (int, str)", "row 0 holds the int 7", "row 2 the str 'x9'")


@pytest.mark.parametrize("column, kind", [
    ("n", "it holds int64"), ("x", "it holds float64"), ("tags", "it holds list of string"),
    ("meta", "it holds struct {a: int64}"),
])
def test_text_column_that_is_not_text_is_refused(tmp_path, root, column, kind):
    pq.write_table(pa.table({"text": ["a", "b"], "n": [1, 2], "x": [0.5, 1.5], "tags": [["a"], ["b"]],
                             "meta": [{"a": 1}, {"a": 2}]}), tmp_path / "x.parquet")
    _refused(check_source, _config(root, "parquet", tmp_path / "x.parquet", text_column=column), root,
             "dataset.text_column", f"column {column!r}", kind, "set dataset.text_column")


def test_missing_columns_are_refused(tmp_path, root):
    files = _jsonl(tmp_path / "c.jsonl", [{"body": "a", "id": 1}])
    _refused(check_source, _config(root, files=files), root, "dataset.text_column", "'text'", "columns: body, id")
    _refused(check_source, _config(root, files=files, text_column="body", id_column="doc"), root,
             "dataset.id_column", "'doc'")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.json", "empty.parquet", "empty.csv"])
def test_empty_split_is_refused(tmp_path, root, name):
    path = tmp_path / name
    if name == "empty.parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    else:
        path.write_text({"empty.jsonl": "", "empty.json": "[]", "empty.csv": "text\n"}[name], encoding="utf-8")
    builder = name.split(".")[1].replace("jsonl", "json")
    _refused(check_source, _config(root, builder, path), root, "dataset.split", "'train'", name, "has no rows")


def test_unknown_split_is_refused(tmp_path, root):
    files = _jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    _refused(check_source, _config(root, files=files, split="test"), root, "dataset.split", "'test'", "'train'")
    cfg = _config(root, files={"validation": str(files)})
    _refused(check_source, cfg, root, "dataset.split", "'train'", "validation")


def test_stream_reads_its_first_row_only(tmp_path, root):
    rows = [{"id": i % 3, "text": t} for i, t in enumerate(_texts(10))]  # repeats a stream check cannot see
    files = _jsonl(tmp_path / "c.jsonl", rows)
    info = check_source(_config(root, files=files, id_column="id", streaming=True, max_samples=8))
    assert (info.rows, info.streaming, info.ids_checked, info.id_type) == (8, True, 1, "int64")
    info = check_source(_config(root, files=files, streaming=True))  # a local json stream has no length metadata
    assert (info.rows, info.split_rows, info.ids_checked) == (None, None, 0)
    numbers = _jsonl(tmp_path / "n.jsonl", [{"text": 1}, {"text": 2}])
    _refused(check_source, _config(root, files=numbers, streaming=True), root, "dataset.text_column", "int64")
    mixed = _jsonl(tmp_path / "m.jsonl", [{"text": 1}, {"text": "two"}])
    _refused(check_source, _config(root, files=mixed, streaming=True), root, "dataset.text_column", "mixed types")
    nulls = _jsonl(tmp_path / "z.jsonl", [{"id": None, "text": "a"}, {"id": 2, "text": "b"}])
    _refused(check_source, _config(root, files=nulls, streaming=True, id_column="id"), root, "dataset.id_column",
             "null in row 0")
    mixed_ids = _jsonl(tmp_path / "i.jsonl", [{"id": 1, "text": "a"}, {"id": "b", "text": "b"}])
    _refused(check_source, _config(root, files=mixed_ids, streaming=True, id_column="id"), root, "dataset.id_column",
             "mixes value types")
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    _refused(check_source, _config(root, files=tmp_path / "e.jsonl", streaming=True), root, "dataset.split",
             "has no rows")
    _refused(check_source, _config(root, files=files, streaming=True, split="test"), root, "dataset.split", "'test'")


# -- the model -------------------------------------------------------------------------------------------------


def _model_config(root, model_dir, **sections):
    return base_config(root, model_dir=model_dir, **sections)


def _spec(cfg):
    """What the run resolves after loading the weights: qk_sniffer.modeling.load_model + resolve_capture."""
    from qk_sniffer.modeling import load_model, resolve_capture

    return resolve_capture(cfg, load_model(cfg, torch.device("cpu")))


@pytest.mark.parametrize("arch, n_layers, layers, n_kv, head_dim", [
    ("llama", 4, [0, 1, 2, 3], 2, 16),
    ("mllama", 4, [0, 2, 3], 2, 16),  # a vision-language checkpoint: layer 1 is cross-attention
    ("mistral3", 3, [0, 1, 2], 2, 16),  # an image-text class whose language model runs
    ("deepseek_v3", 3, [0, 1, 2], 4, 24),  # MLA: q/k heads of nope 16 + rope 8
])
def test_happy_model_counts_agree_with_the_loaded_model(tiny_models, root, arch, n_layers, layers, n_kv, head_dim):
    cfg = _model_config(root, tiny_models(arch))
    info = check_model(cfg)
    assert isinstance(info, ModelInfo)
    assert (info.n_layers, info.n_heads, info.n_kv_heads, info.head_dim) == (n_layers, 4, n_kv, head_dim)
    assert (info.layers, info.max_positions, info.learned_positions) == (layers, 4096, None)
    assert info.attn_implementation == "sdpa" and info.pad_token_id == 0
    spec = _spec(cfg)
    assert (spec.layers, spec.query_heads, spec.key_heads) == (info.layers, info.query_heads, info.key_heads)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == (n_layers, 4, info.n_kv_heads, head_dim)
    assert set(spec.skipped_layers) == set(info.skipped_layers)
    assert not root.exists()


def test_max_length_above_rotary_positions_warns(root, caplog):
    caplog.set_level(logging.WARNING, logger="qk_sniffer")
    info = check_model(_model_config(root, TINY_LLAMA, tokenizer={"max_length": 8192}))
    assert info.max_positions == 4096 and info.learned_positions is None
    [line] = [r.getMessage() for r in caplog.records if "tokenizer.max_length" in r.getMessage()]
    assert "8192" in line and "max_position_embeddings: 4096" in line and "<= 4096" in line


def test_max_length_above_learned_positions_is_refused(tiny_models, root):
    gpt2 = tiny_models("gpt2")
    assert check_model(_model_config(root, gpt2, tokenizer={"max_length": 4096})).learned_positions == "wpe"
    _refused(check_model, _model_config(root, gpt2, tokenizer={"max_length": 5000}), root, "tokenizer.max_length",
             "5000", "n_positions: 4096", "wpe", "set tokenizer.max_length <= 4096")


def test_unsupported_attention_is_refused_with_the_choices(tiny_models, root):
    _refused(check_model, _model_config(root, TINY_LLAMA, model={"attn_implementation": "fancy"}), root,
             "model.attn_implementation", "'fancy'", "eager, sdpa", "leave it unset (qk-sniffer then uses sdpa)")
    _refused(check_model, _model_config(root, tiny_models("gemma2"), model={"attn_implementation": "sdpa"}), root,
             "model.attn_implementation", "'sdpa'", "Gemma2ForCausalLM", "use one of eager", "uses eager")
    info = check_model(_model_config(root, TINY_LLAMA, model={"attn_implementation": "eager"}))
    assert info.attn_implementation == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU a missing flash-attn is refused")
def test_flash_attention_without_a_gpu_is_left_to_the_job(root, caplog):
    caplog.set_level(logging.WARNING, logger="qk_sniffer")
    info = check_model(_model_config(root, TINY_LLAMA, model={"attn_implementation": "flash_attention_2"}))
    assert info.attn_implementation == "flash_attention_2"
    assert "cannot be checked on this machine" in caplog.text


@pytest.mark.parametrize("capture, words", [
    ({"layers": [4]}, ["capture.layers", "layer 4 is out of range", "4 layers", "0..3"]),
    ({"layers": [-5]}, ["capture.layers", "layer -5 is out of range"]),
    ({"heads": [0, 4]}, ["capture.heads", "head 4 is out of range", "4 query heads", "0..3"]),
    ({"layers": []}, ["capture.layers", "empty"]),
    ({"capture_queries": False, "capture_keys": False}, ["capture", "nothing would be captured"]),
])
def test_out_of_range_capture_is_refused(root, capture, words):
    _refused(check_model, _model_config(root, TINY_LLAMA, capture=capture), root, *words)


def test_cross_attention_layer_is_refused(tiny_models, root):
    _refused(check_model, _model_config(root, tiny_models("mllama"), capture={"layers": [1]}), root,
             "capture.layers", "layer 1 cannot be captured", "cross-attention")


def test_head_sampling_larger_than_available_takes_every_pair(root, caplog):
    caplog.set_level(logging.WARNING, logger="qk_sniffer")
    cfg = _model_config(root, TINY_LLAMA, capture={"layers": [0, 1], "head_sampling": {"count": 50, "seed": 3}})
    info = check_model(cfg)
    assert info.head_sampling["candidates"] == info.head_sampling["selected"] == 8
    assert "capture.head_sampling.count: 50 is more than the 8" in caplog.text
    cfg = _model_config(root, TINY_LLAMA, capture={"layers": [0, 1], "head_sampling": {"count": 3, "seed": 3}})
    info = check_model(cfg)
    assert info.head_sampling == _spec(cfg).head_sampling and info.head_sampling["selected"] == 3


def test_tokenizer_without_pad_token_pads_with_eos_and_changes_no_vector(tmp_path, caplog):
    """No pad token is no error: padding goes on the right, without a mask, and never changes a vector."""
    from qk_sniffer.chunk.run import run_chunk
    from qk_sniffer.layout import chunk_dir

    model = tmp_path / "nopad"
    shutil.copytree(TINY_LLAMA, model)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    del tok_cfg["pad_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    caplog.set_level(logging.INFO, logger="qk_sniffer")

    def config(batch):
        return base_config(tmp_path / f"root{batch}", model_dir=model, dataset={"max_samples": 10},
                           tokenizer={"max_length": 40}, inference={"batch_size": batch},
                           capture={"layers": [0, 3], "sampler": {"type": "all"}})

    info = check_model(config(2))
    assert (info.pad_token_id, info.pad_source) == (2, "eos token '</s>'")
    assert "has no pad token" in caplog.text and "padded on the right with id 2" in caplog.text
    caplog.clear()
    check_model(config(1))
    assert "has no pad token" not in caplog.text

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    lengths = np.array([min(len(x), 40) for x in tok(_texts(10))["input_ids"]])
    assert any(len(set(lengths[b])) > 1 for b in source.length_sorted_batches(lengths, 2)), "no batch is padded"
    tables = {}
    for batch in (2, 1):
        cfg = config(batch)
        cfg["workflow"]["num_chunks"] = 1
        manifest = run_chunk(cfg, 0)
        base = chunk_dir(tmp_path / f"root{batch}", 0)
        tables[batch] = {name: pq.read_table(base / rel).sort_by([("example_id", "ascending"), ("position", "ascending")])
                         for name, rel in manifest["files"].items()}
    assert tables[2].keys() == tables[1].keys() and len(tables[1]) == 2 * (4 + 2)
    for name, a in tables[2].items():
        b = tables[1][name]
        assert a.num_rows == b.num_rows > 0
        for col in ("example_id", "position", "bucket"):
            assert a[col].equals(b[col]), f"{name}: {col}"
        va, vb = (np.stack(t["vector"].to_numpy(zero_copy_only=False)) for t in (a, b))
        np.testing.assert_allclose(va, vb, rtol=1e-5, atol=1e-5, err_msg=name)


def test_pad_id_outside_the_embeddings_is_refused(tmp_path, root):
    model = tmp_path / "bigpad"
    shutil.copytree(TINY_LLAMA, model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_special_tokens({"pad_token": "<extra-pad>"})  # id 512: the model has 512 token embeddings
    tok.save_pretrained(str(model))
    _refused(check_model, _model_config(root, model), root, "tokenizer.name", "padding id 512", "512 token embeddings",
             "inference.batch_size: 1")
    assert check_model(_model_config(root, model, inference={"batch_size": 1})).pad_token_id == 512


def test_device_map_without_accelerate_is_refused(root):
    import importlib.util

    if importlib.util.find_spec("accelerate") is not None:
        pytest.skip("accelerate is installed")
    _refused(check_model, _model_config(root, TINY_LLAMA, model={"device_map": {"": 0}}), root, "model.device_map",
             "accelerate")
    assert check_model(_model_config(root, TINY_LLAMA, model={"device_map": "auto"})).n_layers == 4


def test_missing_model_and_tokenizer_are_refused(tmp_path, root):
    _refused(check_model, _model_config(root, tmp_path / "nowhere"), root, "model.name", "does not exist")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    _refused(check_model, _model_config(root, empty), root, "model.name", "could not read the config")
    cfg = _model_config(root, TINY_LLAMA, tokenizer={"name": str(tmp_path / "no-tok")})
    _refused(check_model, cfg, root, "tokenizer.name", "does not exist")
    cfg = _model_config(root, TINY_LLAMA, tokenizer={"name": str(empty)})
    _refused(check_model, cfg, root, "tokenizer.name", "could not load the tokenizer")


@pytest.mark.parametrize("argv, dry", [
    (["snakemake", "-n"], True), (["snakemake", "--dry-run", "--cores", "2"], True), (["snakemake", "--dryrun"], True),
    (["snakemake", "-np"], True), (["snakemake", "--cores", "2"], False), (["snakemake", "-p", "--configfile", "n"], False),
    (["snakemake", "--", "-n"], False), (["snakemake", "-s", "Snakefile"], False),
])
def test_dry_run_is_read_from_the_command_line(argv, dry):
    from qk_sniffer.preflight import dry_run_requested

    assert dry_run_requested(argv) is dry


def test_lint_is_read_from_the_command_line():
    from qk_sniffer.preflight import lint_requested

    assert lint_requested(["snakemake", "--lint"]) and lint_requested(["snakemake", "--lint=json"])
    assert not lint_requested(["snakemake", "--cores", "2"]) and not lint_requested(["--lint"])
