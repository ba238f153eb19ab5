"""Checkpoints inside one chunk, so a killed chunk resumes instead of starting over.

A chunk writes its captures in *segments*: every ``inference.checkpoint_every_s`` seconds the
background writer is closed, which completes one Parquet file per config under
``staging/chunk-<i>/segments/seg-<k>/``, and only then is ``staging/chunk-<i>/progress.json``
rewritten (atomically) to list that segment with the examples it holds. A rerun of the chunk
finds the journal, checks it (same config fingerprint, chunk, examples; every listed file present
with its recorded row count), deletes whatever no journal entry names (the segment the kill cut
short) and runs only the examples no listed segment holds.

Which tokens are kept is a pure function of their coordinates (config/README.md, capture), and the
remaining examples are batched exactly as the tail of an uninterrupted run's length-sorted batch
order, so a resumed chunk holds the same rows as one that was never killed, computed in the same
batches (within one process, bit for bit).

At the end the segments become the chunk's one file per config, sorted by ``(example_id,
position)`` and written exactly as final files are (``qk_sniffer.parquet.write_parquet_atomic``), so
that the merge can append them to ``final/`` byte for byte; then the manifest is written and the
segments and journal are removed. This sort is the one pass over a chunk's rows after its forward
passes: memory holds one config's rows of the chunk per assembling thread.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..layout import DiskFullError, atomic_write_json, data_file, disk_full_errno, remove_stale_temps
from ..parquet import KEYS, write_parquet_atomic

log = logging.getLogger("qk_sniffer")

JOURNAL = "progress.json"
SEGMENTS = "segments"
FORMAT = 1
ASSEMBLE_WORKERS = min(4, os.cpu_count() or 1)  # configs sorted at once: memory holds this many, no more


def _ranges(idx: np.ndarray) -> list[list[int]]:
    """Sorted indices as ``[[start, stop), ...]`` runs (a segment's examples are mostly runs)."""
    idx = np.unique(np.asarray(idx, dtype=np.int64))
    if idx.size == 0:
        return []
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    starts = np.concatenate([idx[:1], idx[breaks]])
    stops = np.concatenate([idx[breaks - 1], idx[-1:]]) + 1
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


class Segment:
    """The segment being written: its directory, writer and what went into it."""

    def __init__(self, path: Path, writer):
        self.path = path
        self.writer = writer
        self.examples: list[np.ndarray] = []
        self.tokens = 0
        self.computed_tokens = 0

    def add(self, idx: np.ndarray, tokens: int, computed: int) -> None:
        self.examples.append(np.asarray(idx))
        self.tokens += tokens
        self.computed_tokens += computed

    @property
    def empty(self) -> bool:
        return not self.examples


class ChunkProgress:
    """The journal of one chunk directory; see the module docstring."""

    def __init__(self, out: Path, ident: dict, n_examples: int, split: str):
        self.out = Path(out)
        self.ident = dict(ident)
        self.split = split
        self.done = np.zeros(n_examples, dtype=bool)
        self.segments: list[dict] = []
        self.resumed: dict | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, out: Path, ident: dict, n_examples: int, split: str) -> ChunkProgress:
        """Resume from ``out``'s journal when it is valid for this chunk, else start from an empty directory."""
        prog = cls(out, ident, n_examples, split)
        journal = prog.out / JOURNAL
        if journal.is_file() and not (prog.out / "manifest.json").exists():
            reason = prog._load(journal)
            if reason is None:
                prog._remove_unlisted()
                remove_stale_temps(prog.out)  # e.g. the journal's own temporary file, when a kill hit its write
                if prog.segments:
                    prog.resumed = {"examples": int(prog.done.sum()), "segments": len(prog.segments)}
                return prog
            log.warning("%s: the previous attempt's checkpoints cannot be used (%s); starting the chunk over",
                        prog.out, reason)
            prog.done[:] = False
            prog.segments = []
        if prog.out.exists():  # a previous attempt (or a finished chunk being redone): nothing in it counts
            shutil.rmtree(prog.out)
        return prog

    def _load(self, journal: Path) -> str | None:
        """Adopt the journal's segments; the reason it cannot be used, or None."""
        try:
            data = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{journal.name} is not readable JSON: {exc}"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            return f"{journal.name} has an unknown format"
        for key, want in self.ident.items():
            if data.get(key) != want:
                return f"{key} was {data.get(key)!r}, now {want!r}"
        segments = data.get("segments")
        if not isinstance(segments, list):
            return f"{journal.name} lists no segments"
        for seg in segments:
            try:
                base = self.out / SEGMENTS / seg["name"]
                for name, count in seg["rows"].items():
                    if count <= 0:
                        continue
                    path = data_file(base, self.split, name)
                    got = pq.ParquetFile(path).metadata.num_rows
                    if got != count:
                        return f"{path} holds {got} rows, the journal recorded {count}"
                for start, stop in seg["done"]:
                    self.done[start:stop] = True
            except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
                return f"segment {seg.get('name') if isinstance(seg, dict) else seg!r} is damaged ({exc})"
        self.segments = segments
        return None

    def _remove_unlisted(self) -> None:
        """Delete segments no journal entry names (the one a kill cut short) and any half-assembled output."""
        listed = {seg["name"] for seg in self.segments}
        base = self.out / SEGMENTS
        if base.is_dir():
            for d in base.iterdir():
                if d.name not in listed:
                    shutil.rmtree(d) if d.is_dir() else d.unlink()
        shutil.rmtree(self.out / "data", ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------
    def pending(self) -> np.ndarray:
        """Indices of the examples no finished segment holds."""
        return np.nonzero(~self.done)[0]

    def segment_path(self) -> Path:
        path = self.out / SEGMENTS / f"seg-{len(self.segments):04d}"
        if path.exists():
            shutil.rmtree(path)
        return path

    def commit(self, seg: Segment, forward_s: float) -> None:
        """Close ``seg``'s writer (its files are complete after this), then record it in the journal."""
        rows = seg.writer.close()
        idx = np.concatenate(seg.examples) if seg.examples else np.zeros(0, dtype=np.int64)
        self.segments.append({
            "name": seg.path.name,
            "done": _ranges(idx),
            "rows": {name: int(n) for name, n in sorted(rows.items())},
            "tokens": seg.tokens,
            "computed_tokens": seg.computed_tokens,
            "forward_s": round(forward_s, 3),
        })
        self.done[idx] = True
        atomic_write_json(self.out / JOURNAL, {"format": FORMAT, **self.ident, "segments": self.segments})

    # -- finishing ----------------------------------------------------------------------------
    def totals(self) -> dict:
        rows: dict[str, int] = {}
        for seg in self.segments:
            for name, n in seg["rows"].items():
                rows[name] = rows.get(name, 0) + n
        return {
            "rows": rows,
            "computed_tokens": sum(seg["computed_tokens"] for seg in self.segments),
        }

    def assemble(self) -> dict[str, int]:
        """Turn the segments into ``data/<split>/<config>/data.parquet`` (one file per config, sorted by key);
        returns the rows per config."""
        rows = self.totals()["rows"]
        names = sorted(n for n, count in rows.items() if count > 0)
        try:
            # pyarrow decodes, sorts and encodes without the GIL: configs are assembled side by side
            with ThreadPoolExecutor(max_workers=ASSEMBLE_WORKERS) as pool:
                list(pool.map(self._assemble_one, names))
        except BaseException as exc:
            # the files assembled so far are made again from the segments by the rerun: their room is given back now
            shutil.rmtree(self.out / "data", ignore_errors=True)
            code = disk_full_errno(exc)
            if code is not None:
                path = exc.path if isinstance(exc, DiskFullError) else self.out / "data"
                raise DiskFullError(path, code, "the chunk kept its checkpoints and wrote no manifest; free space there "
                                                "and run the chunk again (it resumes from them without running the "
                                                "model over its examples again)") from exc
            raise
        return rows

    def _assemble_one(self, name: str) -> None:
        parts = [data_file(self.out / SEGMENTS / seg["name"], self.split, name) for seg in self.segments
                 if seg["rows"].get(name, 0) > 0]
        table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by([(k, "ascending") for k in KEYS])
        path = data_file(self.out, self.split, name)
        write_parquet_atomic(table, path)

    def cleanup(self) -> None:
        """Remove the segments and the journal (after the manifest: a kill here only leaves spare files)."""
        shutil.rmtree(self.out / SEGMENTS, ignore_errors=True)
        (self.out / JOURNAL).unlink(missing_ok=True)
