"""Configs of the original tool's format: every key validates, means what it meant, dry-runs and runs."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml

from qk_sniffer.config import ConfigError, chunk_fingerprint, ignored_keys, load_config, validate_config

from .support.tiny_data import REPO
from .support.workflow_runs import SNIFF_QK, workflow_env

FIXTURES = REPO / "tests" / "fixtures" / "original"
ORIGINALS = sorted(FIXTURES.glob("*.yaml"))

# The original format as its code defines it (issue 16): every key must be accepted.
ORIGINAL_KEYS = {
    "dataset": ["path", "name", "split", "text_column", "id_column", "max_samples", "streaming"],
    "model": ["name", "revision", "dtype", "device_map", "trust_remote_code", "attn_implementation", "config_overrides"],
    "tokenizer": ["name", "max_length", "padding", "trust_remote_code", "padding_side"],
    "inference": ["batch_size", "autocast_dtype", "debug_logging", "debug_log_every_n_batches",
                  "mps_cleanup_every_batches"],
    "capture": ["capture_queries", "capture_keys", "layers", "heads", "head_sampling", "full_attention_only", "sampler",
                "max_rows_per_batch", "queue_size", "min_bucket_size", "capture_pre_rope", "capture_token_strings"],
    "output": ["data_root", "readme_path", "hf_repo_id", "hf_branch", "private", "write_batch_size"],
}
MINIMAL = {"dataset": {"path": "json"}, "model": {"name": "org/model"}}


def with_(**sections) -> dict:
    raw = copy.deepcopy(MINIMAL)
    for k, v in sections.items():
        raw.setdefault(k, {}).update(v)
    return raw


def test_there_are_fixtures_of_both_layouts():
    names = [p.name for p in ORIGINALS]
    assert sum(n.startswith("dec2025_") for n in names) == 6 and sum(n.startswith("later_") for n in names) >= 3


def test_the_every_key_fixture_sets_every_original_key():
    raw = yaml.safe_load((FIXTURES / "later_every_key.yaml").read_text())
    missing = [f"{s}.{k}" for s, keys in ORIGINAL_KEYS.items() for k in keys if k not in (raw.get(s) or {})]
    assert not missing, f"later_every_key.yaml lacks {missing}"
    assert set(raw["capture"]["head_sampling"]) == {"count", "seed"} and set(raw["capture"]["sampler"]) == {"type",
                                                                                                          "base_rate"}


@pytest.mark.parametrize("path", ORIGINALS, ids=lambda p: p.stem)
def test_original_configs_validate(path):
    cfg = load_config(path)
    assert cfg["model"]["dtype"] in ("float32", "float16", "bfloat16")
    assert cfg["inference"]["autocast_dtype"] in (None, "float16", "bfloat16")
    assert cfg["tokenizer"]["padding"] in ("longest", "max_length", "do_not_pad")
    assert cfg["tokenizer"]["padding_side"] == "right" and cfg["output"]["hf_branch"]
    assert validate_config(cfg) == cfg  # the normalised config is stable (the workflow validates it again)


def test_snakemake_validate_accepts_the_normalised_configs():
    """The Snakefile validates our output again with Snakemake's default-filling validator: nothing changes."""
    from snakemake.utils import validate

    from qk_sniffer.config import SCHEMA_PATH

    for path in ORIGINALS:
        ours = load_config(path)
        theirs = copy.deepcopy(ours)
        validate(theirs, str(SCHEMA_PATH), set_default=True)
        assert theirs == ours, path.name


@pytest.mark.parametrize("section,key,given,meant", [
    ("model", "dtype", "fp16", "float16"), ("model", "dtype", "half", "float16"), ("model", "dtype", "bf16", "bfloat16"),
    ("model", "dtype", "fp32", "float32"), ("model", "dtype", "float", "float32"), ("model", "dtype", "auto", "auto"),
    ("inference", "autocast_dtype", "float32", None), ("inference", "autocast_dtype", "fp32", None),
    ("inference", "autocast_dtype", "fp16", "float16"), ("inference", "autocast_dtype", "bf16", "bfloat16"),
    ("tokenizer", "padding", True, "longest"), ("tokenizer", "padding", False, "do_not_pad"),
    ("tokenizer", "padding", "max_length", "max_length"), ("output", "hf_branch", None, "main"),
    ("model", "config_overrides", None, {}),
])
def test_aliases_mean_what_they_meant(section, key, given, meant):
    assert validate_config(with_(**{section: {key: given}}))[section][key] == meant


def test_padding_side_in_either_spelling():
    for side in ("left", "right"):
        tok = validate_config(with_(tokenizer={"padding": side}))["tokenizer"]
        assert tok["padding_side"] == side and tok["padding"] == "longest"
        assert validate_config(with_(tokenizer={"padding": side, "padding_side": side}))["tokenizer"] == tok
    with pytest.raises(ConfigError, match=r"^tokenizer.padding: 'left' is a value of tokenizer.padding_side, which the "
                                          r"config sets to 'right'; remove one of the two keys$"):
        validate_config(with_(tokenizer={"padding": "left", "padding_side": "right"}))
    with pytest.raises(ConfigError, match="tokenizer.padding: 'shortest' is not allowed"):
        validate_config(with_(tokenizer={"padding": "shortest"}))
    with pytest.raises(ConfigError, match="tokenizer.padding: 1 is not allowed"):  # YAML's 1 is not true
        validate_config(with_(tokenizer={"padding": 1}))


def test_a_typo_in_an_original_config_gets_did_you_mean():
    raw = yaml.safe_load((FIXTURES / "later_every_key.yaml").read_text())
    raw["capture"]["head_sampeling"] = raw["capture"].pop("head_sampling")
    raw["inference"]["debug_loging"] = raw["inference"].pop("debug_logging")
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert "unknown key 'capture.head_sampeling'. Did you mean 'head_sampling'?" in str(err.value)
    assert "unknown key 'inference.debug_loging'. Did you mean 'debug_logging'?" in str(err.value)
    with pytest.raises(ConfigError, match="capture.head_sampling: 'count' is a required property"):
        validate_config(with_(capture={"head_sampling": {"seed": 1}}))


def test_ignored_keys_are_documented_and_change_nothing():
    assert ignored_keys() == ["inference.mps_cleanup_every_batches", "capture.queue_size", "output.write_batch_size"]
    text = (REPO / "config" / "README.md").read_text()
    base = validate_config(with_())
    for dotted in ignored_keys():
        section, key = dotted.split(".")
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert "ignored" in row, row
        cfg = validate_config(with_(**{section: {key: 3}}))
        assert chunk_fingerprint(cfg) == chunk_fingerprint(base)


def test_keys_that_change_rows_change_the_fingerprint():
    base = chunk_fingerprint(validate_config(with_()))
    for sections in ({"capture": {"head_sampling": {"count": 2}}}, {"capture": {"max_rows_per_batch": 4}},
                     {"dataset": {"streaming": True}}):
        assert chunk_fingerprint(validate_config(with_(**sections))) != base


def _workdir(tmp_path: Path) -> Path:
    """A working directory where the fixtures' relative paths (models/, config/demo) are the repository's."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("models", "config"):
        (work / name).symlink_to(REPO / name)
    return work


@pytest.mark.parametrize("path", ORIGINALS, ids=lambda p: p.stem)
def test_original_configs_dry_run(tmp_path, path):
    work = _workdir(tmp_path)
    res = subprocess.run([str(SNIFF_QK), "run", "--config", str(path), "-n", "--cores", "1"], capture_output=True,
                         text=True, env=workflow_env(tmp_path), cwd=work, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "sniff_chunk" in out and "merge_staging" in out and "dry-run" in out
    # the dry run needs no token; it says the real run would stop at the remote check
    pushes = (yaml.safe_load(path.read_text(encoding="utf-8")).get("output") or {}).get("hf_repo_id")
    assert ("a real run stops here: output.hf_repo_id: pushing to" in out) == bool(pushes), out[-2000:]
    assert not any(work.glob("data/*/staging"))


def _blake_id(value) -> int:
    return int.from_bytes(hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def test_the_every_key_config_runs_and_means_what_it_meant(tmp_path, monkeypatch, caplog):
    """later_every_key.yaml, unchanged, through sniff-chunk, merge and the card."""
    from qk_sniffer.card import render_readme
    from qk_sniffer.chunk.run import run_chunk
    from qk_sniffer.front_matter import read_front_matter
    from qk_sniffer.merge import merge_staging

    monkeypatch.chdir(_workdir(tmp_path))
    cfg = load_config(FIXTURES / "later_every_key.yaml")
    with caplog.at_level(logging.INFO, logger="qk_sniffer"):
        man = run_chunk(cfg, 0)
    # head_sampling: random.Random(7).sample over (layer, query head) in [0, 1, 3] x [0, 1, 3], layer-major
    candidates = [(layer, head) for layer in (0, 1, 3) for head in (0, 1, 3)]
    picked = random.Random(7).sample(candidates, 4)
    want = {f"l{layer:02d}h{head:02d}q" for layer, head in picked}
    want |= {f"l{layer:02d}h{head // 2:02d}k" for layer, head in picked}  # 4 query heads read 2 key/value heads
    assert set(man["rows"]) == want
    rec = man["model"]["head_sampling"]
    assert (rec["seed"], rec["requested"], rec["candidates"], rec["selected"]) == (7, 4, 9, 4)
    assert rec["query_heads"] == sorted([list(p) for p in picked])
    # the dataset's rows: blake2b ids of doc_id, at most max_rows_per_batch rows per example, token strings
    demo = [json.loads(line) for line in (REPO / "config/demo/corpus.jsonl").read_text().splitlines()[:20]]
    ids = {_blake_id(d["doc_id"]) for d in demo if d["text"].strip()}
    files = sorted(Path("data/sniffed-qk-every-key/staging").glob("chunk-0/data/*/*/data.parquet"))
    assert {f.parent.name for f in files} == want
    for f in files:
        df = pl.read_parquet(f)
        assert set(df["example_id"].to_list()) <= ids and df["token_str"].null_count() == 0
        assert df.group_by("example_id").len()["len"].max() <= 6
    # debug_logging: one line per batch (debug_log_every_n_batches: 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batch ")]
    assert len(lines) == -(-man["examples"] // 4) and all("forward" in m and "flush" in m for m in lines)
    assert man["sampling"]["max_rows_per_batch"] == 6
    # the card records the selection, in the front matter and the body
    merge_staging(cfg)
    render_readme(cfg)
    card = Path("data/sniffed-qk-every-key/final/README.md")
    fm, body = read_front_matter(card)
    assert fm["qk_sniffer"]["splits"]["models_tiny_llama"]["head_sampling"] == rec
    assert "| Head sampling | seed `7`: 4 of 9 (layer, query head) pairs (4 requested): " in card.read_text()
    assert Path(cfg["output"]["readme_path"]).read_text() == card.read_text()
    from qk_sniffer.verify import verify

    report = verify(Path("data/sniffed-qk-every-key"), cfg=cfg, sample_rows=None)
    assert report.ok, report.format()
