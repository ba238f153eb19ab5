"""Figures on matplotlib's Agg canvas (object API: no pyplot, no display) and their reproducible, atomic files."""

from __future__ import annotations

import io
from pathlib import Path

from ..layout import atomic_output

FORMATS = ("png", "svg")
DPI = 110


def new_figure(width: float, height: float):
    """A constrained-layout figure of ``width`` x ``height`` inches at ``DPI``."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _atomic_bytes(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` through a temporary file; returns False (and writes nothing) when unchanged."""
    path = Path(path)
    try:
        if path.is_file() and path.read_bytes() == data:
            return False
    except OSError:
        pass
    with atomic_output(path) as fh:
        fh.write(data)
    return True


def save_figure(fig, base: Path, formats=FORMATS) -> list[Path]:
    """``base`` + ``.png`` / ``.svg``, byte-for-byte reproducible (no dates, fixed SVG ids), each atomic."""
    import matplotlib

    out = []
    for fmt in formats:
        buf = io.BytesIO()
        meta = {"Software": "qk-sniffer"} if fmt == "png" else {"Date": None, "Creator": "qk-sniffer"}
        with matplotlib.rc_context({"svg.hashsalt": "qk-sniffer", "svg.fonttype": "path"}):
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
        # the first save laid the figure out; later formats reuse that layout instead of solving it again
        fig.set_layout_engine("none")
        path = Path(f"{base}.{fmt}")
        _atomic_bytes(path, buf.getvalue())
        out.append(path)
    return out


def no_data(ax, text: str) -> None:
    """Say ``text`` in the middle of an empty ``ax``, without ticks."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])

