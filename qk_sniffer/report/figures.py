"""The figures of ``snakemake --report`` (workflow/rules/report.smk): rows per bucket with the sampler's
expectation, norm quartiles per layer, per-head heatmaps and chunk throughput. ``draw_rows`` is shared
with the dataset card's figure (``qk_sniffer.card.figure``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .canvas import FORMATS, new_figure, no_data, save_figure
from .sources import KINDS

KIND_LABEL = {"q": "queries", "k": "keys"}
KIND_SINGULAR = {"q": "query", "k": "key"}
KIND_COLOR = {"q": "#1f6fb4", "k": "#c8402a"}
MAX_PANELS = 16  # more layers than this: one line per layer instead of one panel per layer
ANNOTATE_CELLS = 256  # heatmaps with at most this many cells print their values


def _bucket_label(sampling: dict | None) -> str:
    """The x axis label: which positions bucket ``b`` holds under ``sampling``."""
    if not sampling:
        return "position bucket"
    if sampling["type"] == "log_uniform":
        return "position bucket b (positions 2^b-1 .. 2^(b+1)-2)"
    return f"position bucket b (positions {sampling.get('min_bucket_size')}*b ..)"


def draw_rows(ax, st: dict, *, compact: bool = False) -> None:
    """Bars of rows per bucket and kind; the expected counts where ``st``'s buckets carry them, and for
    log_uniform the ``base_rate x examples x configs`` line (what full buckets hold)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    table = st["buckets"]
    if not table:
        no_data(ax, "no rows")
        return
    x = np.arange(len(table))
    w = 0.4
    for i, k in enumerate(KINDS):
        vals = np.array([r["rows"][k] for r in table], dtype=float)
        ax.bar(x + (i - 0.5) * w, np.where(vals > 0, vals, np.nan), width=w, color=KIND_COLOR[k],
               label=f"{KIND_LABEL[k]} ({st['config_counts'][k]} configs)")
        if st["config_counts"][k] and all("expected_rows" in r for r in table):
            exp = np.array([r["expected_rows"][k] for r in table], dtype=float)
            ax.plot(x + (i - 0.5) * w, np.where(exp > 0, exp, np.nan), ls="none", marker="_", ms=14, mew=2,
                    color="black", label="expected, lower bound (examples end at their last sampled token)"
                    if i == 0 else None)
    smp = st["sampling"]
    if smp is not None and smp["type"] == "log_uniform" and st["examples"]:
        for k in KINDS:
            if st["config_counts"][k]:
                line = float(smp["base_rate"]) * st["examples"] * st["config_counts"][k]
                ax.axhline(line, color=KIND_COLOR[k], ls=":", lw=1.2,
                           label=f"base_rate x examples x {KIND_SINGULAR[k]} configs = {line:,.0f}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    step = max(1, math.ceil(len(table) / 24))
    ax.set_xticks(x[::step], [str(r["bucket"]) for r in table][::step])
    ax.set_xlabel("position bucket" if compact else _bucket_label(smp))
    ax.set_ylabel("rows (all configs of a kind)")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=7 if compact else 8, loc="upper center", bbox_to_anchor=(0.5, -0.2 if compact else -0.16),
              ncol=2, frameon=False)


def _draw_check(ax, st: dict) -> None:
    """Observed / expected rows per covering example, per bucket and kind, with two standard errors."""
    table = [r for r in st["buckets"] if r.get("covered_examples")]
    if st["sampling"] is None:
        no_data(ax, "sampling settings not recorded for this split\n(or rows of several samplings): no check")
        return
    if not table:
        no_data(ax, "no bucket is fully inside any example")
        return
    x = np.arange(len(table))
    for i, k in enumerate(KINDS):
        if not st["config_counts"][k]:
            continue
        ratio = np.array([np.nan if r["rows_per_covered_example"][k] is None
                          else r["rows_per_covered_example"][k] / r["expected_rows_per_covered_example"]
                          for r in table])
        err = np.array([np.nan if r["standard_error"][k] is None
                        else 2 * r["standard_error"][k] / r["expected_rows_per_covered_example"] for r in table])
        ax.errorbar(x + (i - 0.5) * 0.2, ratio, yerr=err, fmt="o", ms=4, capsize=3, color=KIND_COLOR[k],
                    label=f"{KIND_LABEL[k]} (bars: 2 standard errors)")
    ax.axhline(1.0, color="black", lw=1)
    step = max(1, math.ceil(len(table) / 16))
    ax.set_xticks(x[::step], [f"{r['bucket']}\n{r['covered_examples']}" for r in table][::step])
    ax.set_xlabel("bucket / examples covering it")
    ax.set_ylabel("observed / expected rows per example")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)


def _title(split: str, st: dict, vectors: bool = False) -> str:
    """The figure title; ``vectors``: the figure shows vector statistics, so it names their sample when bounded."""
    model = (st.get("model") or {}).get("name")
    smp = st.get("sampling") or {}
    bits = [f"split {split}"]
    if model:
        bits.append(str(model))
    if smp:
        bits.append(f"{smp['type']} sampler, base_rate {smp['base_rate']:g}, min_bucket_size {smp['min_bucket_size']}")
    sample = st.get("vector_sample") or {}
    if vectors and sample.get("example_id_below") is not None:
        bits.append(f"vectors of examples with id < {sample['example_id_below']} ({sample['rows']:,} rows)")
    return " | ".join(bits)


def render_rows_per_bucket(split: str, st: dict, base: Path, formats=FORMATS) -> list[Path]:
    """Rows per bucket beside the covered-example check of one split; returns the files written."""
    fig = new_figure(11, 5.0)
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[3, 2])
    draw_rows(ax1, st)
    ax1.set_title("sampled rows per bucket", fontsize=10)
    _draw_check(ax2, st)
    ax2.set_title("rows per covering example, observed / expected", fontsize=10)
    fig.suptitle(_title(split, st), fontsize=10)
    return save_figure(fig, base, formats)


def render_norms(split: str, st: dict, kind: str, base: Path, formats=FORMATS) -> list[Path]:
    """Norm quartiles of ``kind`` per bucket: a panel per layer, or one line per layer past ``MAX_PANELS`` layers."""
    per_layer = st["norms"][kind]
    layers = sorted(per_layer)
    if len(layers) <= MAX_PANELS:
        ncols = min(4, max(1, len(layers)))
        nrows = max(1, math.ceil(len(layers) / ncols))
        fig = new_figure(3.0 * ncols + 0.6, 2.3 * nrows + 0.8)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)).ravel()
        for ax, layer in zip(axes, layers):
            d = per_layer[layer]
            bs = sorted(d)
            med = [d[b]["median"] for b in bs]
            ax.fill_between(bs, [d[b]["q1"] for b in bs], [d[b]["q3"] for b in bs], color=KIND_COLOR[kind], alpha=0.25,
                            lw=0, label="quartiles")
            ax.plot(bs, med, color=KIND_COLOR[kind], marker="o", ms=3, lw=1.5, label="median")
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.grid(alpha=0.3)
        for ax in axes[len(layers):]:
            ax.set_visible(False)
        if not layers:
            axes[0].set_visible(True)
            no_data(axes[0], f"no {KIND_LABEL[kind]} captured")
        else:
            axes[0].legend(fontsize=7)
        fig.supxlabel(_bucket_label(st.get("sampling")), fontsize=9)
        fig.supylabel(f"{KIND_SINGULAR[kind]} vector norm", fontsize=9)
    else:
        from matplotlib import cm, colors

        fig = new_figure(10, 4.5)
        ax1, ax2 = fig.subplots(1, 2)
        norm = colors.Normalize(vmin=min(layers), vmax=max(layers))
        cmap = cm.viridis
        for layer in layers:
            d = per_layer[layer]
            bs = sorted(d)
            ax1.plot(bs, [d[b]["median"] for b in bs], color=cmap(norm(layer)), lw=1)
            ax2.plot(bs, [d[b]["q3"] / d[b]["q1"] if d[b]["q1"] > 0 else np.nan for b in bs], color=cmap(norm(layer)),
                     lw=1)
        ax1.set_ylabel(f"median {KIND_SINGULAR[kind]} norm")
        ax2.set_ylabel("upper / lower quartile")
        for ax in (ax1, ax2):
            ax.set_xlabel(_bucket_label(st.get("sampling")))
            ax.grid(alpha=0.3)
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax2, label="layer")
    fig.suptitle(f"{KIND_LABEL[kind]} norms by position bucket | {_title(split, st, vectors=True)}", fontsize=10)
    return save_figure(fig, base, formats)


def _heat(fig, ax, grid: dict, title: str, xlabel: str, *, diverging: bool = False) -> None:
    """A layer x head heatmap of ``grid`` (layer -> head -> value), values printed when it is small."""
    from matplotlib import colormaps

    layers = sorted(grid)
    heads = sorted({h for v in grid.values() for h in v})
    if not layers or not heads:
        no_data(ax, "not captured")
        ax.set_title(title, fontsize=9)
        return
    m = np.full((len(layers), len(heads)), np.nan)
    for i, la in enumerate(layers):
        for j, h in enumerate(heads):
            v = grid[la].get(h)
            if v is not None:
                m[i, j] = v
    cmap = colormaps["RdBu_r" if diverging else "viridis"].with_extremes(bad="0.85")
    lim = 1.0
    if diverging:
        lim = max(0.05, float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0)
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    else:
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, aspect="auto", interpolation="nearest")
    step_x = max(1, len(heads) // 16)
    step_y = max(1, len(layers) // 20)
    ax.set_xticks(np.arange(len(heads))[::step_x], [str(h) for h in heads][::step_x])
    ax.set_yticks(np.arange(len(layers))[::step_y], [str(la) for la in layers][::step_y])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    if m.size <= ANNOTATE_CELLS:
        finite = m[np.isfinite(m)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    light = abs(m[i, j]) > lim * 0.5 if diverging else m[i, j] < mid
                    ax.text(j, i, f"{m[i, j]:.2f}" if diverging else f"{m[i, j]:.3g}", ha="center", va="center",
                            fontsize=7, color="white" if light else "black")
    fig.colorbar(im, ax=ax, shrink=0.85)


def render_heads(split: str, st: dict, base: Path, formats=FORMATS) -> list[Path]:
    """Mean query and key norms per head and the mean q-k cosine per query head, one heatmap each."""
    heads = st["heads"]
    n_q = max((len(v) for v in heads["mean_norm"]["q"].values()), default=1)
    n_layers = max(len(heads["mean_norm"]["q"]), len(heads["mean_norm"]["k"]), 1)
    fig = new_figure(min(22, 6 + 1.1 * max(n_q, 4) * 1.2), min(14, 2.2 + 0.32 * n_layers))
    ax1, ax2, ax3 = fig.subplots(1, 3, width_ratios=[max(n_q, 1), max(1, max((len(v) for v in
                                 heads["mean_norm"]["k"].values()), default=1)), max(n_q, 1)])
    _heat(fig, ax1, heads["mean_norm"]["q"], "mean query norm", "query head")
    _heat(fig, ax2, heads["mean_norm"]["k"], "mean key norm", "key/value head")
    cos = {la: {h: c["mean"] for h, c in v.items()} for la, v in heads["cosine"].items()}
    _heat(fig, ax3, cos, "mean cos(q of head h, k of its key head)\nsame example, same bucket", "query head h",
          diverging=True)
    fig.suptitle(_title(split, st, vectors=True), fontsize=10)
    return save_figure(fig, base, formats)


def render_chunk_timings(chunks: list[dict], base: Path, formats=FORMATS) -> list[Path]:
    """Throughput and load/forward seconds of every staged chunk."""
    fig = new_figure(10, 3.8)
    ax1, ax2 = fig.subplots(1, 2)
    if not chunks:
        no_data(ax1, "no staged chunk manifests under staging/")
        no_data(ax2, "no staged chunk manifests under staging/")
    else:
        x = np.arange(len(chunks))
        labels = [str(c["chunk"]) for c in chunks]
        tps = np.array([c["tokens_per_s"] if c["tokens_per_s"] is not None else np.nan for c in chunks], dtype=float)
        bars = ax1.bar(x, tps, color="#4c8c4a")
        for rect, c in zip(bars, chunks):
            ax1.annotate(f"{c['tokens'] or 0:,} tok\n{c['examples'] or 0:,} ex", (rect.get_x() + rect.get_width() / 2,
                         rect.get_height() if np.isfinite(rect.get_height()) else 0), ha="center", va="bottom",
                         fontsize=7, xytext=(0, 2), textcoords="offset points")
        if np.isfinite(tps).any():
            ax1.set_ylim(0, float(np.nanmax(tps)) * 1.25)
        ax1.set_xticks(x, labels)
        ax1.set_xlabel("chunk")
        ax1.set_ylabel("tokens / s (forward pass)")
        ax1.set_title("throughput per chunk", fontsize=10)
        ax1.grid(axis="y", alpha=0.3)
        load = np.array([c["load_s"] or 0 for c in chunks], dtype=float)
        fwd = np.array([c["forward_s"] or 0 for c in chunks], dtype=float)
        ax2.bar(x, load, color="0.6", label="load (data, tokenizer, model)")
        ax2.bar(x, fwd, bottom=load, color="#4c8c4a", label="forward + capture + write")
        ax2.set_xticks(x, labels)
        ax2.set_xlabel("chunk")
        ax2.set_ylabel("seconds")
        ax2.set_title("time per chunk", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.grid(axis="y", alpha=0.3)
        devices = sorted({str(c["device"]) for c in chunks})
        fig.suptitle(f"{len(chunks)} chunks on {', '.join(devices)}", fontsize=10)
    return save_figure(fig, base, formats)

