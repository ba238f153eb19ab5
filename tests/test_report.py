"""report: statistics of a real final dataset checked against independent polars/numpy computations,
every figure decoded, the dataset card's figure, and the workflow's `snakemake --report`."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from qk_sniffer.card import CARD_FIGURE, render_card_figure
from qk_sniffer.report import (
    BINS_PER_DECADE,
    ReportError,
    compute_stats,
    render_report,
    report_main,
    rows_per_group,
)

from .support.tiny_data import CORPUS, REPO, TINY_LLAMA, merged_sections
from .support.tiny_data import build_final as build_demo_final

SPLIT = "tiny"
SECTIONS = {"workflow": {"num_chunks": 2}, "dataset": {"max_samples": 24}}
BIN = 10 ** (1 / BINS_PER_DECADE)  # the relative width of one norm histogram bin


def build_final(root: Path, **sections) -> dict:
    """A real final dataset: the tiny model over the demo corpus, two chunks merged, the card rendered."""
    return build_demo_final(root, **merged_sections(SECTIONS, sections))


@pytest.fixture(scope="module")
def final(tmp_path_factory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("report") / "root"
    return build_final(root), root


@pytest.fixture(scope="module")
def rendered(final, tmp_path_factory) -> tuple[list[Path], Path, dict]:
    cfg, root = final
    out = tmp_path_factory.mktemp("report-out")
    files = render_report(cfg, out, root=root)
    return files, out, json.loads((out / "run" / "stats.json").read_text())


def files_of(root: Path, split: str = SPLIT, kind: str | None = None, layer: int | None = None) -> list[Path]:
    base = root / "final" / "data" / split
    return sorted(p / "data.parquet" for p in base.iterdir()
                  if (kind is None or p.name.endswith(kind)) and (layer is None or p.name.startswith(f"l{layer:02d}h")))


def with_norm(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col("vector").cast(pl.Array(pl.Float64, df.schema["vector"].size))
                           .arr.eval(pl.element().pow(2)).arr.sum().sqrt().alias("norm"))


def pair_cosines(q: pl.DataFrame, k: pl.DataFrame) -> np.ndarray:
    """cos(q, k) of every pair of a query row and a key row with the same (example_id, bucket), by brute force."""
    pairs = q.select("example_id", "bucket", "vector").join(
        k.select("example_id", "bucket", pl.col("vector").alias("kv")), on=["example_id", "bucket"])
    qv = pairs.get_column("vector").to_numpy().astype(np.float64)
    kv = pairs.get_column("kv").to_numpy().astype(np.float64)
    return (qv * kv).sum(1) / np.linalg.norm(qv, axis=1) / np.linalg.norm(kv, axis=1)


# -- figures ------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, f"{path}: shape {img.shape}"
    rgb = img[..., :3]
    assert float(rgb.max() - rgb.min()) > 0.5, f"{path} is blank"
    # more than background and one colour: a drawn figure has many distinct pixel values
    rgb8 = np.round(rgb * 255).astype(np.uint32)
    colours = np.unique(rgb8[..., 0] << 16 | rgb8[..., 1] << 8 | rgb8[..., 2]).size
    assert colours > 50, f"{path} has almost nothing drawn ({colours} colours)"


def assert_svg(path: Path) -> None:
    tree = ET.parse(path)
    root = tree.getroot()
    assert root.tag.endswith("svg"), f"{path}: root element {root.tag}"
    drawn = [e for e in root.iter() if e.tag.split("}")[-1] in ("path", "use", "rect", "line", "polyline", "text")]
    assert len(drawn) > 20, f"{path}: only {len(drawn)} drawing elements"


def test_every_figure_is_a_drawn_image(rendered):
    files, out, _ = rendered
    rel = {p.relative_to(out).as_posix() for p in files}
    for stem in (f"rows_per_bucket/{SPLIT}", f"norms/{SPLIT}/queries", f"norms/{SPLIT}/keys", f"heads/{SPLIT}",
                 "run/chunk_timings"):
        assert {f"{stem}.png", f"{stem}.svg"} <= rel, f"{stem} missing from {sorted(rel)}"
    assert {"run/run_metadata.html", "run/stats.json"} <= rel
    for p in files:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert_png(p)
        elif p.suffix == ".svg":
            assert_svg(p)
    # no temporary file left behind by the atomic writes
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_metadata_table_names_model_dataset_and_sampler(rendered, final):
    cfg, _ = final
    _, out, _ = rendered
    text = (out / "run" / "run_metadata.html").read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert str(TINY_LLAMA) in text  # the model
    assert ">json<" in text and ">train<" in text  # the source dataset
    assert ">log_uniform<" in text and ">base_rate<" in text  # the sampler
    for i in range(cfg["workflow"]["num_chunks"]):  # one line per staged chunk
        assert f'<td class="value">{i}</td>' in text


def test_rendering_twice_gives_the_same_bytes(final, rendered, tmp_path):
    cfg, root = final
    files, out, _ = rendered
    again = render_report(cfg, tmp_path, root=root, workers=2)  # figures drawn by worker processes this time
    assert sorted(p.relative_to(tmp_path) for p in again) == sorted(p.relative_to(out) for p in files)
    for p in again:
        if p.suffix in (".png", ".svg", ".html", ".json"):
            assert p.read_bytes() == (out / p.relative_to(tmp_path)).read_bytes(), p


def test_figures_are_drawn_here_when_worker_processes_fail(final, rendered, tmp_path, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    from qk_sniffer.report import workflow_report as report_module

    class Broken:
        def submit(self, *args):
            raise BrokenProcessPool("a worker could not start")

        def shutdown(self, **kw):
            pass

    monkeypatch.setattr(report_module, "_figure_pool", lambda workers: Broken())
    cfg, root = final
    files, out, _ = rendered
    again = render_report(cfg, tmp_path, root=root, workers=2)
    assert sorted(p.relative_to(tmp_path) for p in again) == sorted(p.relative_to(out) for p in files)
    assert all(p.stat().st_size > 0 for p in again)


# -- statistics against independent computations -----------------------------------------------


def test_rows_per_bucket_match_polars(final, rendered):
    _, root = final
    _, _, stats = rendered
    st = stats["splits"][SPLIT]
    for kind in "qk":
        want = (pl.scan_parquet(files_of(root, kind=kind)).group_by("bucket").len().collect())
        want = {int(b): int(n) for b, n in want.iter_rows()}
        got = {int(r["bucket"]): r["rows"][kind] for r in st["buckets"] if r["rows"][kind]}
        assert got == want and sum(want.values()) > 100
    all_rows = pl.scan_parquet(files_of(root)).select(pl.len()).collect().item()
    assert st["rows_total"] == all_rows
    assert st["examples"] == pl.scan_parquet(files_of(root)).select(pl.col("example_id").n_unique()).collect().item()


def test_covering_example_check_matches_polars(final, rendered):
    """Bucket bounds and expectations by hand for log_uniform (base_rate 2, min_bucket_size 8), counts by polars."""
    _, root = final
    _, _, stats = rendered
    st = stats["splits"][SPLIT]
    assert st["sampling"]["type"] == "log_uniform" and st["sampling"]["base_rate"] == 2.0
    # p0 = 3: bucket 3 is positions 0..14 kept with p = 2/8; bucket b > 3 is 2^b-1 .. 2^(b+1)-2 with p = 2/2^b
    bounds = {b: ((0, 14) if b == 3 else (2**b - 1, 2 ** (b + 1) - 2)) for b in range(3, 8)}
    extent = (pl.scan_parquet(files_of(root)).group_by("example_id").agg(pl.col("position").max().alias("mx"))
              .collect())
    ext = extent.get_column("mx").to_numpy().astype(np.int64)
    n_cfg = {k: len(files_of(root, kind=k)) for k in "qk"}
    checked = 0
    for row in st["buckets"]:
        b = int(row["bucket"])
        lo, hi = bounds[b]
        p = 2.0 / 2**b
        assert (row["first_position"], row["last_position"]) == (lo, hi)
        assert row["keep_probability"] == pytest.approx(p)
        assert row["expected_rows_per_covered_example"] == pytest.approx((hi - lo + 1) * p)
        assert row["covered_examples"] == int((ext > hi).sum())
        in_bucket = np.clip(ext + 1 - lo, 0, hi - lo + 1).sum()
        for kind in "qk":
            assert row["expected_rows"][kind] == pytest.approx(in_bucket * p * n_cfg[kind])
            covered = (pl.scan_parquet(files_of(root, kind=kind)).filter(pl.col("bucket") == b)
                       .join(extent.lazy(), on="example_id").filter(pl.col("mx") > hi).select(pl.len()).collect().item())
            assert row["covered_rows"][kind] == covered
            if row["covered_examples"]:
                ratio = covered / (row["covered_examples"] * n_cfg[kind]) / ((hi - lo + 1) * p)
                # the sampler keeps what was asked: within 4 standard errors of the expectation
                se = row["standard_error"][kind] / row["expected_rows_per_covered_example"]
                assert abs(ratio - 1) < 4 * se, (b, kind, ratio, se)
                checked += 1
    assert checked >= 4


def test_norm_quantiles_and_means_match_numpy(final, rendered):
    _, root = final
    _, _, stats = rendered
    for kind, layer in (("q", 1), ("k", 2)):
        df = with_norm(pl.read_parquet(files_of(root, kind=kind, layer=layer)))
        got = stats["splits"][SPLIT]["norms"][kind][str(layer)]
        assert set(got) == {str(b) for b in df.get_column("bucket").unique()}
        for (b,), part in df.group_by(["bucket"]):
            norms = np.sort(part.get_column("norm").to_numpy())
            g = got[str(b)]
            assert g["rows"] == norms.size
            assert g["mean"] == pytest.approx(norms.mean(), rel=1e-9)
            for key, q in (("q1", 0.25), ("median", 0.5), ("q3", 0.75)):
                # the histogram's quantile lies in the bin of the order statistic x_k, k = ceil(q n)
                x_k = norms[max(1, math.ceil(q * norms.size)) - 1]
                assert x_k / BIN <= g[key] <= x_k * BIN, (kind, layer, b, key, g[key], x_k)


def test_head_means_and_cosine_match_brute_force(final, rendered):
    _, root = final
    _, _, stats = rendered
    heads = stats["splits"][SPLIT]["heads"]
    model = stats["splits"][SPLIT]["model"]
    group = model["num_heads"] // model["num_kv_heads"]
    assert group == 2  # the tiny Llama has grouped-query attention: 4 query heads, 2 key heads
    for path in files_of(root):
        df = with_norm(pl.read_parquet(path))
        name = path.parent.name
        layer, head, kind = int(name[1:3]), int(name[4:6]), name[-1]
        assert heads["mean_norm"][kind][str(layer)][str(head)] == pytest.approx(df.get_column("norm").mean(), rel=1e-9)
    layer = 3
    for h in range(model["num_heads"]):
        q = pl.read_parquet(root / f"final/data/{SPLIT}/l{layer:02d}h{h:02d}q/data.parquet")
        k = pl.read_parquet(root / f"final/data/{SPLIT}/l{layer:02d}h{h // group:02d}k/data.parquet")
        cos = pair_cosines(q, k)
        got = heads["cosine"][str(layer)][str(h)]
        assert got["kv_head"] == h // group
        assert got["pairs"] == cos.size > 50
        assert got["mean"] == pytest.approx(cos.mean(), rel=1e-9, abs=1e-12)


def test_chunk_timings_come_from_the_manifests(final, rendered):
    _, root = final
    _, _, stats = rendered
    manifests = [json.loads(p.read_text()) for p in sorted((root / "staging").glob("chunk-*/manifest.json"))]
    assert [c["chunk"] for c in stats["chunks"]] == [m["chunk"] for m in manifests] == [0, 1]
    for c, m in zip(stats["chunks"], manifests):
        assert c["tokens_per_s"] == m["timings"]["tokens_per_s"] > 0
        assert (c["tokens"], c["examples"]) == (m["tokens"], m["examples"])


def test_compute_stats_of_one_split_and_an_unknown_split(final):
    _, root = final
    assert list(compute_stats(root, SPLIT)["splits"]) == [SPLIT]
    with pytest.raises(ReportError, match="split 'nope' has no data.*found: tiny"):
        compute_stats(root, "nope")


# -- the dataset card's figure and table ----------------------------------------------------------


def test_card_figure_and_rows_per_group(final, tmp_path):
    _, src = final
    root = tmp_path / "root"
    shutil.copytree(src / "final", root / "final")
    path = render_card_figure(root)
    assert path == root / "final" / CARD_FIGURE and path.parent.name == "figures"
    assert_png(path)
    before = (path.stat().st_mtime_ns, path.read_bytes())
    assert render_card_figure(root, SPLIT) == path
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before  # unchanged bytes: not rewritten
    groups = rows_per_group(root)
    assert list(groups) == [SPLIT]
    g = groups[SPLIT]
    for kind in "qk":
        assert g[kind] == sum(pq.ParquetFile(p).metadata.num_rows for p in files_of(root, kind=kind)) > 0
        assert g["configs"][kind] == len(files_of(root, kind=kind))
    assert g["total"] == g["q"] + g["k"]
    for layer, counts in g["layers"].items():
        for kind in "qk":
            want = pl.scan_parquet(files_of(root, kind=kind, layer=layer)).select(pl.len()).collect().item()
            assert counts[kind] == want


def test_card_figure_of_an_empty_dataset_and_an_unknown_split(tmp_path):
    path = render_card_figure(tmp_path / "root")
    assert_png(path)
    assert rows_per_group(tmp_path / "root") == {}
    with pytest.raises(ReportError, match="split 'tiny' has no data"):
        render_card_figure(tmp_path / "root", SPLIT)


# -- other settings -----------------------------------------------------------------------------


def test_float16_uniform_per_head_and_a_head_subset(tmp_path):
    """float16 vectors, the uniform sampler with per-head decisions, query heads 1 and 3 only (key heads 0, 1)."""
    root = tmp_path / "root"
    cfg = build_final(root, workflow={"num_chunks": 1},
                      capture={"vector_dtype": "float16", "heads": [1, 3], "layers": [0, 2],
                               "min_bucket_size": 16, "sampler": {"type": "uniform", "base_rate": 4.0, "per_head": True}})
    files = report_main(cfg, tmp_path / "out")
    stats = json.loads((tmp_path / "out" / "run" / "stats.json").read_text())["splits"][SPLIT]
    assert stats["sampling"]["type"] == "uniform" and stats["independent_streams"] == {"q": 4, "k": 4}
    for row in stats["buckets"]:
        b = int(row["bucket"])
        assert (row["first_position"], row["last_position"]) == (16 * b, 16 * b + 15)
        assert row["expected_rows_per_covered_example"] == pytest.approx(4.0)
    assert set(stats["heads"]["cosine"]["0"]) == {"1", "3"}
    assert {c["kv_head"] for c in stats["heads"]["cosine"]["2"].values()} == {0, 1}
    df = with_norm(pl.read_parquet(root / f"final/data/{SPLIT}/l02h03q/data.parquet"))
    assert df.schema["vector"].inner == pl.Float16
    assert stats["heads"]["mean_norm"]["q"]["2"]["3"] == pytest.approx(df.get_column("norm").mean(), rel=1e-6)
    for p in files:
        if p.suffix == ".png":
            assert_png(p)


def test_without_recorded_sampling_the_expectations_are_left_out(final, tmp_path):
    cfg, src = final
    root = tmp_path / "root"
    shutil.copytree(src / "final" / "data", root / "final" / "data")  # no card, no .merged.json, no staging
    stats = compute_stats(root)
    st = stats["splits"][SPLIT]
    assert st["sampling"] is None and st["model"] is None and stats["chunks"] == []
    assert st["buckets"] and all("expected_rows" not in r for r in st["buckets"])
    assert sum(r["rows"]["q"] for r in st["buckets"]) > 0
    assert st["heads"]["cosine"] == {}  # which key head a query head reads is unknown
    files = render_report(cfg, tmp_path / "out", root=root)
    for p in files:
        if p.suffix == ".png":
            assert_png(p)


# -- the workflow ---------------------------------------------------------------------------------


def _report_wired() -> str | None:
    """Why the end-to-end test cannot run yet, or None."""
    snakefile = (REPO / "Snakefile").read_text()
    if not re.search(r'^include:\s*"workflow/rules/report\.smk"', snakefile, re.M):
        return "the Snakefile does not include workflow/rules/report.smk yet"
    from qk_sniffer.cli import build_parser

    try:
        build_parser().parse_args(["report", "--config", "x.yaml", "--out", "d"])
    except SystemExit:
        return "the CLI has no `report --out` command yet"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_report_wired() is not None, reason=str(_report_wired()))
def test_workflow_report_html_holds_every_figure(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    cfg = {
        "dataset": {"path": "json", "data_files": str(CORPUS), "split": "train", "max_samples": 24},
        "model": {"name": str(TINY_LLAMA)},
        "tokenizer": {"max_length": 96},
        "inference": {"batch_size": 8},
        "capture": {"min_bucket_size": 8, "sampler": {"type": "log_uniform", "base_rate": 2.0}},
        "output": {"data_root": "data/run", "split_name": SPLIT},
        "workflow": {"num_chunks": 2},
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(json.dumps(cfg))
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
            "--configfile", str(cfg_path), "--cores", "2"]
    run = subprocess.run(base, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    out = work / "data" / "run" / "report"
    figures = [out / f"rows_per_bucket/{SPLIT}.png", out / f"norms/{SPLIT}/queries.png",
               out / f"norms/{SPLIT}/keys.png", out / f"heads/{SPLIT}.png", out / "run/chunk_timings.png"]
    for f in figures:
        assert_png(f)
    html = tmp_path / "report.html"
    rep = subprocess.run([*base, "--report", str(html)], capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-4000:]
    text = html.read_text(encoding="utf-8")
    assert len(text) > 100_000  # the figures are embedded, not linked
    log = rep.stderr + rep.stdout
    for name in ("tiny.png", "queries.png", "keys.png", "chunk_timings.png", "run_metadata.html", "stats.json"):
        assert f"Adding {name}" in log, f"{name} not collected into the report"
        assert name in text
    # every figure's bytes are in the page (as base64 data URIs)
    import base64

    for f in figures:
        assert base64.b64encode(f.read_bytes()).decode()[:200] in text, f"{f} not embedded"
    # captions rendered with the split and the workflow description with the model
    for phrase in ("Rows of split", "Norms of the queries of split", "Norms of the keys of split",
                   "Mean q-k cosine", "Throughput of every staged chunk", str(TINY_LLAMA)):
        assert phrase in text, phrase
    # nothing left to do: the report rule is part of the default target and up to date
    dry = subprocess.run([*base, "-n"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr


def test_large_model_layouts_draw(tmp_path):
    """80 layers x 64 query heads (8 key heads): one line per layer for the norms, unannotated heatmaps."""
    from qk_sniffer.report import render_heads, render_norms

    rng = np.random.default_rng(0)
    layers, n_q, n_kv, buckets = range(80), 64, 8, range(7, 14)
    norms = {la: {b: dict(zip(("q1", "median", "q3"), np.sort(rng.uniform(1, 50, 3)).tolist())) for b in buckets}
             for la in layers}
    st = {
        "sampling": {"type": "log_uniform", "base_rate": 4.0, "min_bucket_size": 128},
        "model": {"name": "big/model", "num_heads": n_q, "num_kv_heads": n_kv},
        "norms": {"q": norms, "k": norms},
        "heads": {
            "mean_norm": {"q": {la: {h: float(rng.uniform(5, 20)) for h in range(n_q)} for la in layers},
                          "k": {la: {h: float(rng.uniform(5, 20)) for h in range(n_kv)} for la in layers}},
            "cosine": {la: {h: {"kv_head": h // 8, "pairs": 10, "mean": float(rng.uniform(-0.3, 0.3))}
                            for h in range(n_q)} for la in layers},
        },
    }
    for p in render_norms("big", st, "q", tmp_path / "norms", formats=("png",)):
        assert_png(p)
    for p in render_heads("big", st, tmp_path / "heads", formats=("png", "svg")):
        assert_png(p) if p.suffix == ".png" else assert_svg(p)


def test_vector_statistics_read_a_bounded_prefix_of_examples(final, rendered, tmp_path, monkeypatch):
    """Past VECTOR_SAMPLE_ROWS rows, norms and cosines come from a prefix of the examples; counts stay exact."""
    import qk_sniffer.report.scan as report

    _, src = final
    _, _, full = rendered
    root = tmp_path / "root"
    shutil.copytree(src, root)
    for path in files_of(root):  # several row groups, so the cutoff falls inside the file
        pq.write_table(pq.read_table(path), path, row_group_size=16)
    read = []
    orig = pq.ParquetFile.iter_batches

    def spy(self, *a, columns=None, **kw):
        read.append("vector" in (columns or []))
        return orig(self, *a, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    largest = max(files_of(root), key=lambda p: pq.ParquetFile(p).metadata.num_rows)
    limit = pq.ParquetFile(largest).metadata.num_rows // 3
    monkeypatch.setattr(report, "VECTOR_SAMPLE_ROWS", limit)
    monkeypatch.setattr(report, "BATCH_ROWS", 32)  # several batches per file, so the cutoff falls inside one
    st = report.compute_stats(root)["splits"][SPLIT]
    # the cutoff: the example id at row `limit` of the largest config
    cutoff = pq.read_table(largest, columns=["example_id"]).column("example_id")[limit].as_py()
    assert st["vector_sample"]["example_id_below"] == cutoff
    assert any(read) and not all(read)  # rows past the cutoff were read without their vectors
    # counts are over every row
    want = full["splits"][SPLIT]
    assert st["rows_total"] == want["rows_total"]
    assert [(b["bucket"], b["rows"]) for b in st["buckets"]] == [(b["bucket"], b["rows"]) for b in want["buckets"]]
    assert [b.get("covered_rows") for b in st["buckets"]] == [b.get("covered_rows") for b in want["buckets"]]
    # vector statistics are over the rows of examples below the cutoff, in every config
    sampled = 0
    for path in files_of(root):
        df = with_norm(pl.read_parquet(path).filter(pl.col("example_id") < cutoff))
        name = path.parent.name
        layer, head, kind = int(name[1:3]), int(name[4:6]), name[-1]
        assert st["configs"][name]["vector_rows"] == df.height
        assert st["heads"]["mean_norm"][kind][layer][head] == pytest.approx(df.get_column("norm").mean(), rel=1e-9)
        sampled += df.height
    assert st["vector_sample"]["rows"] == sampled < want["rows_total"]
    layer, h, group = 2, 3, 2
    q = pl.read_parquet(root / f"final/data/{SPLIT}/l{layer:02d}h{h:02d}q/data.parquet").filter(pl.col("example_id") < cutoff)
    k = pl.read_parquet(root / f"final/data/{SPLIT}/l{layer:02d}h{h // group:02d}k/data.parquet")
    cos = pair_cosines(q, k)
    got = st["heads"]["cosine"][layer][h]
    assert got["pairs"] == cos.size > 0
    assert got["mean"] == pytest.approx(cos.mean(), rel=1e-9, abs=1e-12)
