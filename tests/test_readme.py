"""render_readme: front matter configs/aggregates, metadata, user content, real datasets.load_dataset."""

from __future__ import annotations

import glob
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.chunk.run import run_chunk
from qk_sniffer.front_matter import split_front_matter
from qk_sniffer.layout import parse_config_name
from qk_sniffer.merge import merge_staging
from qk_sniffer.readme import (
    BEGIN,
    END,
    VIEWER_MAX_CONFIGS,
    build_configs,
    generated_body,
    render_readme,
)

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
    assert "3,000" in body and "dataset viewer" in body
    small = {f"s{i}": ["l00h00q"] for i in range(31)}
    body = generated_body(small, {}, "org/repo", len(build_configs(small)))
    assert "31 splits" in body and "3,000" not in body
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
