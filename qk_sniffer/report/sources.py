"""Where the report reads from: the final dataset's splits and config files, what was recorded about each split,
and the manifests of the staged chunks.

Every read of another qk_sniffer module's on-disk records (``merge``: the merged-split record, the final
config files, the staged chunks; ``card``: the dataset card's front matter) happens in this module.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ..errors import QkSnifferError
from ..front_matter import read_front_matter
from ..layout import final_dir, parse_config_name
from ..store import MERGED_NAME, card_splits, final_configs, merged_record, scan_chunks

KINDS = ("q", "k")  # the two kinds of config file: queries and keys


class ReportError(QkSnifferError, ValueError):
    """The report cannot be drawn; the message names the file and the fix."""


def damaged(path: Path, exc: BaseException) -> ReportError:
    """The error for a config file that cannot be decoded, with how to get it back."""
    return ReportError(
        f"{path} is not readable Parquet ({type(exc).__name__}: {exc}); delete it and pull the remote again "
        "(delete final/.snapshot.json and rerun pull_hub) or rerun the chunks that produced it, then merge again"
    )


def split_metadata(root: Path, split: str) -> dict:
    """Model, dataset and sampling settings recorded for ``split``, and where they were read.

    ``final/.merged.json`` (the latest merge) wins for the split it merged; the ``qk_sniffer:``
    front matter of ``final/README.md`` covers the others. Keys absent from both are absent.
    """
    final = final_dir(root)
    meta: dict = {}
    readme = final / "README.md"
    if readme.is_file():
        fm, _ = read_front_matter(readme)
        rec = card_splits(fm).get(split)
        if rec is not None:
            meta.update(rec)
            meta["source"] = "README.md"
    merged = merged_record(final, split)
    if merged is not None:
        run = merged.run or {}
        if merged.sampling:
            meta["sampling"] = merged.sampling
        for key in ("model", "dataset"):
            if run.get(key):
                meta[key] = run[key]
        if (run.get("model") or {}).get("layer_windows") is not None:
            meta["layer_windows"] = run["model"]["layer_windows"]
        if merged.mixed_sampling:
            meta["mixed_sampling"] = merged.mixed_sampling
        meta["run"] = run
        meta["source"] = MERGED_NAME
    return meta


def discover_splits(root: Path) -> list[str]:
    """Splits with at least one config file under ``final/data/``."""
    base = final_dir(root) / "data"
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and final_configs(final_dir(root), d.name))


def selected_splits(root: Path, split: str | None) -> list[str]:
    """Every split found (``split`` None) or ``[split]``; a named split without data is a :class:`ReportError`."""
    found = discover_splits(root)
    if split is None:
        return found
    if split not in found:
        raise ReportError(
            f"split {split!r} has no data under {final_dir(root) / 'data'} (found: {', '.join(found) or 'none'}); "
            "run the workflow (or merge_staging) first, or name one of the splits found"
        )
    return [split]


def config_table(root: Path, split: str) -> list[tuple[int, int, str, Path]]:
    """``(layer, head, kind, path)`` of every config file of ``split``: by layer, keys before queries, then head."""
    out = []
    for name, path in final_configs(final_dir(root), split).items():
        layer, head, kind = parse_config_name(name)
        out.append((layer, head, kind, path))
    return sorted(out, key=lambda t: (t[0], t[2] == "q", t[1]))


def rows_per_group(root: Path) -> dict:
    """Rows per split, kind and layer, from the Parquet footers only (no data is read).

    ``{split: {"q": rows, "k": rows, "total": rows, "configs": {"q": n, "k": n},
    "layers": {layer: {"q": rows, "k": rows}}}}``; layers are ints, sorted.
    """
    out: dict = {}
    for split in discover_splits(root):
        entry = {"q": 0, "k": 0, "total": 0, "configs": {"q": 0, "k": 0}, "layers": {}}
        for layer, _head, kind, path in config_table(root, split):
            n = num_rows(path)
            entry[kind] += n
            entry["total"] += n
            entry["configs"][kind] += 1
            entry["layers"].setdefault(layer, {"q": 0, "k": 0})[kind] += n
        entry["layers"] = dict(sorted(entry["layers"].items()))
        out[split] = entry
    return out


def num_rows(path: Path) -> int:
    """Rows of one config file, from its Parquet footer."""
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - any decoding failure means a damaged file
        raise damaged(path, exc) from exc


def chunk_timings(root: Path) -> list[dict]:
    """Examples, tokens and throughput of every complete staged chunk (sorted by chunk index)."""
    chunks, _ = scan_chunks(root)
    out = []
    for _, m in chunks:
        t = m.timings
        out.append({
            "chunk": m.chunk, "split": m.split, "examples": m.examples, "tokens": m.tokens,
            "computed_tokens": m.computed_tokens, "rows": m.total_rows, "device": m.device,
            "tokens_per_s": t.get("tokens_per_s"), "load_s": t.get("load_s"), "forward_s": t.get("forward_s"),
            "total_s": t.get("total_s"),
        })
    return out
