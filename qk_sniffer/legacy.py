"""Datasets of the original qk-sniffer tool: recognised and refused, never mixed with this project's format.

The original tool wrote the columns ``bucket``, ``example_id``, ``position``, ``vector`` (a list of float32)
and ``sliding_window`` (optionally ``token_str``), without ``layer``/``head``/``kind`` and without a record of
its sampling, in two layouts:

- ``data/<split>/lLLhHH{q|k}/data.parquet`` next to its dataset card (its README layout). The paths are this
  project's too, so a file there is the original's when its Parquet schema (read from the footer alone)
  lacks the ``layer``/``head``/``kind`` columns this project always writes;
- ``lLLhHH{q|k}/data.parquet`` at the root of a branch holding one model (its later layout). This project
  never puts a config directory at the top of a tree, so the paths alone say it (even in a remote's file
  listing, before anything is downloaded).

Each stage that reads or publishes a dataset (sniff-chunk, pull, merge, render-readme, push, verify) refuses
one with :class:`OriginalDatasetError`: one line saying what was found, where, and the way out (another data
root, branch or repo, or ``sniff-qk migrate``, :mod:`qk_sniffer.migrate`, which converts it explicitly).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from .config import sanitize_split
from .errors import QkSnifferError
from .front_matter import read_front_matter
from .layout import CONFIG_RE, final_dir

OWN_COLUMNS = ("layer", "head", "kind")  # written by this project, never by the original tool
ROW_COLUMNS = ("bucket", "example_id", "position", "vector")  # what both tools write
# the sampling recorded for a split converted from the original tool: which sampler kept its rows is unknown
ORIGINAL_SAMPLING = {
    "type": "original_tool",
    "note": "rows captured by the original qk-sniffer tool, whose sampler and settings were not recorded",
}
LAYOUTS = {
    "readme": "the original tool's README layout data/<split>/lLLhHH{q|k}/data.parquet, without layer/head/kind columns",
    "branch": "the original tool's per-model-branch layout lLLhHH{q|k}/data.parquet at the top",
}


class OriginalDatasetError(QkSnifferError, RuntimeError):
    """A dataset of the original tool where this project's format is expected; the message is one line."""


@dataclass(frozen=True)
class Found:
    """An original-tool dataset: where (a directory or a remote), one of its files (relative to it), its layout."""

    where: str
    example: str
    layout: str  # "readme" or "branch"

    def message(self, way_out: str) -> str:
        return (f"{self.where} holds a dataset of the original qk-sniffer tool ({self.example}: {LAYOUTS[self.layout]}); "
                f"it is not mixed with this project's format. {way_out}")


def is_original_sampling(record) -> bool:
    """Whether a split's recorded sampling is :data:`ORIGINAL_SAMPLING` (rows converted by ``sniff-qk migrate``)."""
    return isinstance(record, dict) and record.get("type") == ORIGINAL_SAMPLING["type"]


def is_original_schema(names: Iterable[str]) -> bool:
    names = set(names)
    return {"example_id", "position", "vector"} <= names and not set(OWN_COLUMNS) <= names


def _parquet_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".parquet" and p.is_file() and not p.name.startswith("."))


def top_configs(base: Path) -> list[tuple[str, list[Path]]]:
    """Config directories at the top of ``base`` holding Parquet files (the per-model-branch layout)."""
    base = Path(base)
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.iterdir()):
        if CONFIG_RE.match(d.name) and d.is_dir():
            files = _parquet_files(d)
            if files:
                out.append((d.name, files))
    return out


def nested_configs(base: Path) -> Iterator[tuple[str, str, list[Path]]]:
    """``(split, config, files)`` under ``base/data/<split>/<config>/`` (the README layout's paths)."""
    data = Path(base) / "data"
    if not data.is_dir():
        return
    for split in sorted(data.iterdir()):
        if split.name.startswith(".") or not split.is_dir():
            continue
        for d in sorted(split.iterdir()):
            if CONFIG_RE.match(d.name) and d.is_dir():
                files = _parquet_files(d)
                if files:
                    yield split.name, d.name, files


def _original_file(path: Path) -> bool:
    try:
        names = pq.read_schema(path).names
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the checks that read it
        return False
    return is_original_schema(names)


def in_tree(base: Path, where: str | None = None) -> Found | None:
    """The original-tool dataset in the tree ``base`` (either layout), or None. Reads footers only, stopping at the
    first file of the original's schema (a tree in this project's format costs one footer per file)."""
    base = Path(base)
    where = where if where is not None else str(base)
    tops = top_configs(base)
    if tops:
        return Found(where, tops[0][1][0].relative_to(base).as_posix(), "branch")
    for _split, _name, files in nested_configs(base):
        for f in files:
            if _original_file(f):
                return Found(where, f.relative_to(base).as_posix(), "readme")
    return None


def in_listing(paths: Iterable[str], where: str) -> Found | None:
    """The per-model-branch layout in a remote's file listing (paths relative to its root), or None."""
    for rel in sorted(paths):
        parts = rel.split("/")
        if len(parts) == 2 and CONFIG_RE.match(parts[0]) and parts[1].endswith(".parquet"):
            return Found(where, rel, "branch")
    return None


def original_metadata(base: Path) -> dict[str, dict]:
    """Split -> model/dataset the original tool recorded (its card's ``models:`` and ``_saver_state.json``), if any."""
    out: dict[str, dict] = {}
    for state_path in (base / "data" / "_saver_state.json", base / "_saver_state.json"):
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        models = state.get("model_metadata") if isinstance(state, dict) else None
        for model, meta in (models.items() if isinstance(models, dict) else ()):
            if isinstance(meta, dict) and isinstance(meta.get("sanitized_split"), str):
                ds = {"path": meta.get("source_dataset"), "name": meta.get("dataset_name") or None,
                      "split": meta.get("dataset_split")}
                out[meta["sanitized_split"]] = {"model": {"name": model},
                                                **({"dataset": ds} if ds["path"] else {})}
    try:

        fm, _ = read_front_matter(base / "README.md")
    except Exception:  # noqa: BLE001 - the original's card is optional and only adds model names
        fm = {}
    entries = fm.get("models") if isinstance(fm, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name != "none":
            out.setdefault(sanitize_split(name), {"model": {"name": name}})
    return out


# -- the refusals -----------------------------------------------------------------------------


def local_problem(root: Path, *, final: bool = True) -> str | None:
    """The one-line refusal for the data root ``root`` (its top, and ``final/`` unless ``final=False``), or None."""
    root = Path(root)
    found = in_tree(root)
    if found is not None:
        return found.message(f"Set output.data_root to a new directory and convert this one into it: "
                             f"sniff-qk migrate {root} --config CONFIG")
    if final:
        f = final_dir(root)
        found = in_tree(f)
        if found is not None:
            return found.message(_final_way_out(f))
    return None


def refuse_local(root: Path, *, final: bool = True) -> None:
    """Raise :class:`OriginalDatasetError` when the data root (or its ``final/``) holds an original-tool dataset."""
    problem = local_problem(root, final=final)
    if problem is not None:
        raise OriginalDatasetError(problem)


def refuse_final(final: Path) -> None:
    found = in_tree(final)
    if found is not None:
        raise OriginalDatasetError(found.message(_final_way_out(final)))


def _final_way_out(final: Path) -> str:
    return (f"Move {final} out of the data root, then convert it into this data root: "
            "sniff-qk migrate <the moved folder> --config CONFIG")


REMOTE_WAY_OUT = ("Use another branch or repo (output.hf_branch, output.hf_repo_id; output.remote_dir), or convert it: "
                  "sniff-qk migrate --config CONFIG reads it from this remote into the data root, then publish the "
                  "result to another branch or repo")


def refuse_remote(found: Found | None) -> None:
    """Raise for an original-tool dataset found on a remote (nothing was pulled or pushed)."""
    if found is not None:
        raise OriginalDatasetError(found.message(f"Nothing was pulled or pushed. {REMOTE_WAY_OUT}"))


def refuse_remote_dir(remote) -> None:
    """A remote directory (``output.remote_dir``) holding the original's dataset and no record of this project's
    (its head is None): a push would put this project's files next to it. A no-op for the Hub."""
    base = getattr(remote, "root", None)
    if isinstance(base, Path) and remote.head() is None:
        refuse_remote(in_tree(base, remote.describe()))
