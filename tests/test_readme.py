"""render_readme: front matter configs/aggregates, metadata, user content, real datasets.load_dataset."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.card import (
    BEGIN,
    END,
    VIEWER_MAX_CONFIGS,
    build_configs,
    generated_body,
    render_readme,
)
from qk_sniffer.chunk.run import run_chunk
from qk_sniffer.front_matter import split_front_matter
from qk_sniffer.layout import parse_config_name
from qk_sniffer.merge import merge_staging

from .support.tiny_data import DEMO_CHUNKS, base_config, merged_sections

SECTIONS = DEMO_CHUNKS  # what the session fixture staged_demo_chunks staged
SPLIT = "tiny"


@pytest.fixture
def staged(staged_demo_chunks) -> Path:
    """The session's two staged chunks of ``SECTIONS``; copied by each test."""
    return staged_demo_chunks


def _cfg(root: Path, **extra) -> dict:
    return base_config(root, **merged_sections(SECTIONS, extra))


@pytest.fixture
def merged_root(tmp_path, staged) -> Path:
    root = tmp_path / "root"
    shutil.copytree(staged / "staging", root / "staging")
    cfg = _cfg(root)
    merge_staging(cfg)
    render_readme(cfg)
    return root


def _front(root: Path) -> tuple[dict, str]:
    text = (root / "final" / "README.md").read_text()
    fm, body = split_front_matter(text)
    assert yaml.safe_load(yaml.safe_dump(fm)) == fm
    return fm, body


def _members(name: str, all_names: list[str]) -> set[str]:
    """Which concrete configs an aggregate must hold, from the naming rules alone."""
    if name == "all":
        return set(all_names)
    if name in ("all_q", "all_k"):
        return {n for n in all_names if n.endswith(name[-1])}
    if name.startswith("layer"):
        lay, _, kind = name[5:].partition("_")
        return {n for n in all_names if n.startswith(f"l{lay}h") and (not kind or n.endswith(kind))}
    if parse_config_name(name):
        return {name} & set(all_names)
    return {n for n in all_names if n[:-1] == name}


def _resolve(final: Path, path) -> set[str]:
    paths = [path] if isinstance(path, str) else path
    return {Path(p).parent.name for pat in paths for p in glob.glob(str(final / pat))}


def _check_configs(fm: dict, final: Path) -> dict[str, dict[str, set[str]]]:
    """Every entry resolves, per split, to exactly the configs its name promises; returns name -> split -> set."""
    on_disk = {d.name: sorted(p.parent.name for p in d.glob("*/data.parquet")) for d in (final / "data").iterdir()}
    entries = fm["configs"]
    names = [e["config_name"] for e in entries]
    assert len(names) == len(set(names))
    assert [e["config_name"] for e in entries if e.get("default")] == ["all"]
    out: dict[str, dict[str, set[str]]] = {}
    for e in entries:
        assert set(e) <= {"config_name", "default", "data_files"}
        per_split = {}
        for item in e["data_files"]:
            assert set(item) == {"split", "path"}
            got = _resolve(final, item["path"])
            want = _members(e["config_name"], on_disk[item["split"]])
            assert got == want and got, (e["config_name"], item)
            per_split[item["split"]] = got
        # a split is listed iff it has at least one member
        assert set(per_split) == {s for s, names_ in on_disk.items() if _members(e["config_name"], names_)}
        out[e["config_name"]] = per_split
    return out


def test_configs_and_aggregates_exact(merged_root):
    fm, body = _front(merged_root)
    final = merged_root / "final"
    got = _check_configs(fm, final)
    concrete = sorted(p.parent.name for p in (final / "data" / SPLIT).glob("*/data.parquet"))
    heads = sorted({n[:-1] for n in concrete})
    expected = {"all", "all_q", "all_k"} | {f"layer{i:02d}{s}" for i in range(4) for s in ("", "_q", "_k")}
    expected |= set(heads) | set(concrete)
    assert set(got) == expected
    assert got["l00h02"] == {SPLIT: {"l00h02q"}}  # the tiny Llama has 2 key heads: no l00h02k
    assert got["l00h01"] == {SPLIT: {"l00h01q", "l00h01k"}}
    meta = fm["qk_sniffer"]["splits"][SPLIT]
    merged = __import__("json").loads((final / ".merged.json").read_text())
    assert meta["rows_total"] == merged["rows_split_total"] == sum(pq.read_metadata(final / "data" / SPLIT / n /
                                                                                      "data.parquet").num_rows
                                                                     for n in concrete)
    assert meta["configs"] == 24 and meta["model"]["head_dim"] == 16
    assert meta["sampling"]["base_rate"] == 2.0 and meta["dataset"]["max_samples"] == 12
    assert sum(r["q"] + r["k"] for r in meta["rows_per_bucket"]) == meta["rows_total"]
    assert body.count(BEGIN) == 1 and body.count(END) == 1
    assert "### Split `tiny`" in body and 'load_dataset("path/to/dataset", "l00h00q", split="tiny")' in body
    assert "| 3 | 0-14 |" in body  # log_uniform with min_bucket_size 8: bucket 3 spans positions 0..14


def test_two_splits_listed_per_config(tmp_path, staged):
    root = tmp_path / "root"
    shutil.copytree(staged / "staging", root / "staging")
    cfg = _cfg(root)
    merge_staging(cfg)
    render_readme(cfg)
    tiny_files = {p: p.stat().st_mtime_ns for p in (root / "final" / "data" / SPLIT).rglob("*.parquet")}
    shutil.rmtree(root / "staging")
    # a second split in the same root: only layer 1, queries only
    cfg2 = base_config(root, output={"split_name": "tiny2"}, capture={"layers": [1], "capture_keys": False},
                       dataset={"max_samples": 6})
    run_chunk(cfg2, 0)
    merge_staging(cfg2)
    render_readme(cfg2)
    fm, body = _front(root)
    got = _check_configs(fm, root / "final")
    assert set(got["l01h00q"]) == {"tiny", "tiny2"}
    assert set(got["l00h00q"]) == {"tiny"}
    assert set(got["l01h00k"]) == {"tiny"}
    assert set(got["layer01"]) == {"tiny", "tiny2"} and set(got["layer01_k"]) == {"tiny"}
    assert set(got["all"]) == {"tiny", "tiny2"} and set(got["all_k"]) == {"tiny"}
    splits = fm["qk_sniffer"]["splits"]
    assert set(splits) == {"tiny", "tiny2"}
    assert splits["tiny"]["configs"] == 24 and splits["tiny2"]["configs"] == 4
    assert splits["tiny"]["dataset"]["max_samples"] == 12 and splits["tiny2"]["dataset"]["max_samples"] == 6
    assert splits["tiny2"]["rows_total"] == sum(
        pq.read_metadata(p).num_rows for p in (root / "final" / "data" / "tiny2").rglob("*.parquet"))
    assert {p: p.stat().st_mtime_ns for p in tiny_files} == tiny_files  # the other split was not rewritten
    assert "### Split `tiny`" in body and "### Split `tiny2`" in body


def test_user_content_and_extra_keys_preserved(tmp_path, staged, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    shutil.copytree(staged / "staging", root / "staging")
    cfg = _cfg(root, output={"readme_path": "cards/README.md"})
    readme = root / "final" / "README.md"
    readme.parent.mkdir(parents=True)
    readme.write_text("---\nlicense: mit\ntags:\n- attention\npretty_name: Tiny QK\n---\n# My dataset\n\n"
                      "Hand-written intro.\n")
    merge_staging(cfg)
    render_readme(cfg)
    text = readme.read_text()
    fm, body = split_front_matter(text)
    assert list(fm)[:3] == ["license", "tags", "pretty_name"] and fm["license"] == "mit"
    assert fm["tags"] == ["attention"] and "configs" in fm and "qk_sniffer" in fm
    assert body.startswith("# My dataset\n\nHand-written intro.\n") and body.count(BEGIN) == 1
    assert (tmp_path / "cards" / "README.md").read_text() == text
    # the user adds a footer after the generated section and a key; the next render keeps both
    readme.write_text(text.replace("license: mit", "license: mit\nlanguage: en") + "\nFooter by hand.\n")
    render_readme(cfg)
    text2 = readme.read_text()
    fm2, body2 = split_front_matter(text2)
    assert fm2["language"] == "en" and body2.rstrip().endswith("Footer by hand.")
    assert body2.count(BEGIN) == 1 and body2.count(END) == 1 and "Hand-written intro." in body2
    assert fm2["configs"] == fm["configs"] and fm2["qk_sniffer"] == fm["qk_sniffer"]
    # nothing changed: the card is not rewritten, not even its timestamp
    stamp = readme.stat().st_mtime_ns
    merge_staging(cfg)
    render_readme(cfg)
    assert readme.read_text() == text2 and readme.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", ["l00h00q", "layer00", "all", "all_k", "l00h01"])
def test_load_dataset_reads_configs(merged_root, tmp_path, name):
    import datasets

    final = merged_root / "final"
    members = _members(name, sorted(p.parent.name for p in (final / "data" / SPLIT).glob("*/data.parquet")))
    rows = sum(pq.read_metadata(final / "data" / SPLIT / m / "data.parquet").num_rows for m in members)
    ds = datasets.load_dataset(str(final), name, split=SPLIT, cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == rows > 0
    assert ds.features["vector"] == datasets.List(datasets.Value("float32"), length=16)
    seen = {(r["layer"], r["head"], r["kind"]) for r in ds.select_columns(["layer", "head", "kind"])}
    assert {f"l{la:02d}h{h:02d}{k}" for la, h, k in seen} == members


def test_viewer_limits_are_warned():
    names = [f"l{la:02d}h{h:02d}{k}" for la in range(80) for h in range(20) for k in "qk"]
    splits = {"big": names}
    entries = build_configs(splits)
    assert len(entries) > VIEWER_MAX_CONFIGS
    body = generated_body(splits, {}, "org/repo", len(entries))
    assert f"> **Note:** this card lists {len(entries):,} configs; the Hub's dataset viewer shows a few thousand at " \
           "most (this card warns above 3,000), so some configs are not browsable there. `load_dataset` loads every " \
           "one of them." in body.split("\n")
    small = {f"s{i}": ["l00h00q"] for i in range(31)}
    body = generated_body(small, {}, "org/repo", len(build_configs(small)))
    assert "> **Note:** this dataset has 31 splits; the Hub's dataset viewer handles about 30. `load_dataset` loads " \
           "every one of them." in body.split("\n")
    assert "3,000" not in body and body.endswith("```\n\n" + END) and body.startswith(BEGIN + "\n")
    assert "**Note:**" not in generated_body({"s": ["l00h00q"]}, {}, "org/repo", 7)


def test_layer_globs_do_not_cross_widths(tmp_path):
    """A model with more than 99 layers names configs l000h000q: ``l00h*`` must not match them and back."""
    final = tmp_path / "final"
    layout = {"wide": ["l000h000q", "l000h001k", "l001h000q", "l010h000q", "l100h000q"],
              "narrow": ["l00h00q", "l00h00k", "l01h00q", "l10h00q"]}
    for split, names in layout.items():
        for n in names:
            (final / "data" / split / n).mkdir(parents=True)
            (final / "data" / split / n / "data.parquet").write_bytes(b"")
    entries = {e["config_name"]: e for e in build_configs(layout)}
    for e in entries.values():
        for item in e["data_files"]:
            assert _resolve(final, item["path"]) == _members(e["config_name"], layout[item["split"]])
    assert {i["split"] for i in entries["layer00"]["data_files"]} == {"narrow"}
    assert {i["split"] for i in entries["layer000"]["data_files"]} == {"wide"}


def test_card_embeds_summary_figure_and_group_table(merged_root):
    import polars as pl

    fm, body = _front(merged_root)
    figure = merged_root / "final" / "figures" / "rows_per_bucket.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 1000
    assert "![Rows per position bucket, all layers](figures/rows_per_bucket.png)" in body
    q_rows = sum(pl.scan_parquet(p).select(pl.len()).collect().item()
                 for p in (merged_root / "final" / "data" / "tiny").glob("l00h*q/data.parquet"))
    assert f"| `layer00` | 6 | {q_rows:,} |" in body


# -- the card's text, byte for byte ------------------------------------------------------------------------------

EXPECTED_CARD = Path(__file__).parent / "fixtures" / "card" / "expected_README.md"


def _write_config_file(path: Path, buckets: list[int], first_example: int) -> None:
    """A config file holding only what the card reads: ``bucket`` and ``example_id``."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    ids = [f"doc-{first_example + i % 3:05d}" for i in range(len(buckets))]
    pq.write_table(pa.table({"bucket": pa.array(buckets, pa.int32()), "example_id": ids}), path)


def _fixed_root(root: Path) -> dict:
    """A data root whose card exercises every row the body can hold, with nothing that depends on the clock.

    ``gemma``: the split of the latest merge (``.merged.json``: sliding and chunked layers, RoPE on some layers only,
    a transform after the rotation, a skipped layer, sampled heads, mixed sampling); ``older``: a split the existing
    card describes (uniform sampler, previous sampling); ``handmade``: a split copied in by hand, known only from its
    files (a sampler the card cannot place positions for). The existing card has user keys, an intro and a footer.
    """
    final = root / "final"
    for name, buckets in {"l00h00q": [3, 3, 4, 6, 6, 6, 7], "l00h00k": [3, 4, 7], "l00h01q": [6, 7, 7, 8],
                          "l01h00q": [3, 6], "l01h00k": [4, 4, 4, 8], "l01h01q": [8]}.items():
        _write_config_file(final / "data" / "gemma" / name / "data.parquet", buckets, 0)
    for name, buckets in {"l00h00q": [0, 1, 2], "l00h00k": [0, 0, 2, 2]}.items():
        _write_config_file(final / "data" / "older" / name / "data.parquet", buckets, 7)
    _write_config_file(final / "data" / "handmade" / "l02h03q" / "data.parquet", [2, 2, 6], 3)
    sampling = {"type": "log_uniform", "base_rate": 2.0, "seed": 0, "per_head": False, "min_bucket_size": 8,
                "capture_pre_rope": True, "max_length": 96, "max_rows_per_batch": None}
    model = {"name": "org/gemma-tiny", "revision": "abc123", "dtype": "bfloat16", "attn_implementation": "eager",
             "num_layers": 3, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16, "layer_windows": [None, 512, None],
             "layer_attention": ["full", "sliding:512", "chunked:8192"], "rope_layers": [0, 1],
             "rope_unknown_layers": [2], "post_rotation_transform": {"q": [1], "k": []},
             "skipped_layers": {"2": "not an attention layer"},
             "head_sampling": {"seed": 5, "selected": 3, "candidates": 4, "requested": 3,
                               "query_heads": [[0, 0], [0, 1], [1, 1]]}}
    merged = {"split": "gemma", "merged_at": "2025-01-02T03:04:05Z", "rows_split_total": 21,
              "buckets": {"q": {"3": 3, "4": 1, "6": 5, "7": 3, "8": 2}, "k": {"3": 1, "4": 4, "7": 1, "8": 1}},
              "sampling": sampling, "mixed_sampling": {"recorded": {**sampling, "base_rate": 1.0}},
              "run": {"model": model, "dataset": {"path": "org/corpus", "name": "en", "split": "train",
                                                  "text_column": "text", "id_column": "doc_id", "max_samples": 12}}}
    (final / ".merged.json").write_text(json.dumps(merged), encoding="utf-8")
    older = {"model": {"name": "org/older", "revision": None, "dtype": "float32", "attn_implementation": "sdpa"},
             "dataset": {"path": "json", "name": None, "split": "train", "text_column": "text", "max_samples": None},
             "sampling": {"type": "uniform", "base_rate": 0.5, "min_bucket_size": 4},
             "previous_sampling": [{"type": "uniform", "base_rate": 1.0, "min_bucket_size": 4}],
             "rows_per_bucket": [{"bucket": 0, "q": 1, "k": 2}, {"bucket": 1, "q": 1, "k": 0},
                                 {"bucket": 2, "q": 1, "k": 2}],
             "rows_total": 7, "configs": 1, "updated_at": "2024-06-07T08:09:10Z"}
    front = {"license": "mit", "qk_sniffer": {"splits": {"older": older}}, "pretty_name": "QK demo"}
    (final / "README.md").write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n# QK demo\n\nIntro.\n\n"
                                     f"{BEGIN}\nstale\n{END}\n\nFooter by hand.\n", encoding="utf-8")
    return base_config(root, output={"split_name": "gemma", "hf_repo_id": "org/qk-demo"})


def test_card_text_is_the_stored_card(tmp_path):
    """The whole card of a fixed data root (front matter and body), byte for byte; a deliberate change to the card's
    text updates ``fixtures/card/expected_README.md`` in the same commit."""
    root = tmp_path / "root"
    cfg = _fixed_root(root)
    render_readme(cfg)
    text = (root / "final" / "README.md").read_text(encoding="utf-8")
    assert text == EXPECTED_CARD.read_text(encoding="utf-8")
    render_readme(cfg)  # rendered again: the same bytes
    assert (root / "final" / "README.md").read_text(encoding="utf-8") == text


def test_the_body_template_ships_in_the_wheel():
    """``card/templates/*.j2`` is package data (pyproject.toml), so an installed package can render the card."""
    import fnmatch
    import tomllib

    import qk_sniffer.card.body as body

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["qk_sniffer.card"]
    template = Path(body.__file__).parent / "templates" / body.TEMPLATE
    assert template.is_file()
    assert any(fnmatch.fnmatch(f"templates/{body.TEMPLATE}", p) for p in patterns)
