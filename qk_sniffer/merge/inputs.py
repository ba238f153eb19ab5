"""What a merge reads and checks before it writes anything: the staged chunks, whether they belong to this
config and sampling, and each config's files (readable, one schema).

Every refusal happens here, so a merge that is refused has written nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from .. import legacy
from ..chunk.plan import describe_config_change, manifest_fingerprint_matches
from ..config import chunk_fingerprint, data_root, sampling_settings, split_name
from ..front_matter import ReadmeError, read_front_matter
from ..layout import data_file, final_dir, remove_stale_temps
from ..parquet import Footer, read_footer
from ..records import ChunkManifest
from ..store import CARD_NAME, StoreError, recorded_sampling, scan_chunks
from .errors import MergeError, corrupt_final, corrupt_staged

log = logging.getLogger("qk_sniffer")


@dataclass
class MergeInputs:
    """One merge's inputs: the split it writes, the complete chunks and their files per config; ``schemas`` and
    ``footers`` are filled in by :func:`check_config`."""

    final: Path
    split: str
    fingerprint: str
    sampling: dict  # this run's sampling settings
    mixed: dict | None  # the recorded sampling appended to, when it differs and mixing is allowed
    chunks: list[tuple[Path, ChunkManifest]]  # complete chunks: (dir, manifest)
    incomplete: list[str]  # names of chunk dirs without a manifest
    staged: dict[str, list[Path]]  # config name -> its staged files, in chunk order
    schemas: dict[str, pa.Schema] = field(default_factory=dict)  # config name -> its Arrow schema
    footers: dict[Path, Footer] = field(default_factory=dict)  # footers read by the check, used again to append

    def final_file(self, cfg_name: str) -> Path:
        """``final/data/<split>/<config>/data.parquet`` of a config."""
        return data_file(self.final, self.split, cfg_name)


def read_inputs(cfg: dict, root: Path | None = None) -> MergeInputs:
    """The staged chunks to merge into ``final/`` and their files, with every refusal that needs no Parquet:
    a dataset of the original tool, chunks of another config, another sampling, a file a manifest lists
    that is missing."""
    root = Path(root) if root is not None else data_root(cfg)
    split = split_name(cfg)
    final = final_dir(root)
    legacy.refuse_local(root)  # a dataset of the original tool is converted by sniff-qk migrate, never merged into
    remove_stale_temps(final)  # a merge killed mid-write left them; verify_dataset refuses a final/ holding any
    fingerprint = chunk_fingerprint(cfg)
    current_sampling = sampling_settings(cfg)
    chunks, incomplete = _complete_chunks(root)
    _refuse_stale_chunks(chunks, cfg, fingerprint, split)
    mixed = _check_sampling(cfg, final, split, current_sampling, chunks)
    return MergeInputs(final, split, fingerprint, current_sampling, mixed, chunks, incomplete, _staged_files(chunks))


def _complete_chunks(root: Path) -> tuple[list[tuple[Path, ChunkManifest]], list[str]]:
    """The complete chunks and the names of incomplete ones (each warned about: it is left out)."""
    try:
        chunks, incomplete = scan_chunks(root)
    except StoreError as exc:
        raise MergeError(str(exc)) from exc
    for name in incomplete:
        log.warning("staging/%s has no manifest (an unfinished or crashed chunk): ignored", name)
    return chunks, incomplete


def _refuse_stale_chunks(chunks: list[tuple[Path, ChunkManifest]], cfg: dict, fingerprint: str, split: str) -> None:
    """Refuse chunks another config produced (their manifests' fingerprint differs), naming what changed."""
    stale = [(d, m) for d, m in chunks if not manifest_fingerprint_matches(m, cfg)]
    if stale:
        lines = [f"  {d}: {describe_config_change(m, cfg)}" for d, m in stale]
        raise MergeError(
            f"staged chunks were produced by a different config than this run (fingerprint {fingerprint}, "
            f"split {split!r}):\n" + "\n".join(lines) +
            "\nDelete those chunk dirs (or rerun them with this config: snakemake <chunk dir>/manifest.json) "
            "and merge again."
        )


def _card_front_matter(final: Path) -> dict | None:
    """The front matter of ``final/README.md``; None when there is no card."""
    readme = final / CARD_NAME
    if not readme.is_file():
        return None
    try:
        fm, _ = read_front_matter(readme)
    except ReadmeError as exc:
        raise MergeError(str(exc)) from exc
    return fm


def _check_sampling(cfg: dict, final: Path, split: str, current_sampling: dict,
                    chunks: list[tuple[Path, ChunkManifest]]) -> dict | None:
    """The sampling settings recorded for the split must match this run's unless mixing is allowed (only
    checked when there are chunks to merge; an unreadable card is refused either way). Returns what
    ``.merged.json`` records as ``mixed_sampling`` (None when nothing is mixed)."""
    recorded, recorded_in = recorded_sampling(final, split, _card_front_matter(final))
    if not (recorded and chunks):
        return None
    diff = _sampling_diff(recorded, current_sampling)
    if not diff:
        return None
    what = ", ".join(f"{k}: recorded {a!r}, this run {b!r}" for k, (a, b) in diff.items())
    if not cfg["output"].get("allow_mixed_sampling"):
        raise MergeError(
            f"split {split!r} in {recorded_in} was captured with different sampling settings ({what}). "
            "Appending would mix two samplings in one split. Use the recorded settings, write to another "
            "split (output.split_name), or set output.allow_mixed_sampling: true to append anyway."
        )
    log.warning("split %r: appending with different sampling settings (%s)", split, what)
    return {"recorded": recorded, "recorded_in": Path(recorded_in).name}


def _sampling_diff(recorded: dict, current: dict) -> dict:
    """Keys present in both whose values differ: ``{key: (recorded, current)}``."""
    out = {}
    for k in sorted(set(recorded) & set(current)):
        a, b = recorded[k], current[k]
        if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
            same = float(a) == float(b)
        else:
            same = a == b
        if not same:
            out[k] = (a, b)
    return out


def _staged_files(chunks: list[tuple[Path, ChunkManifest]]) -> dict[str, list[Path]]:
    """Staged files per config (chunk order); refuses a file a manifest lists that is missing."""
    staged: dict[str, list[Path]] = {}
    for d, m in chunks:
        for cfg_name, rel in sorted(m.files.items()):
            p = d / rel
            if not p.is_file():
                raise MergeError(f"{d}/manifest.json lists {rel} but {p} is missing; delete {d} and rerun that chunk")
            staged.setdefault(cfg_name, []).append(p)
    return staged


def check_config(inputs: MergeInputs, cfg_name: str) -> tuple[pa.Schema, dict[Path, Footer]]:
    """The config's Arrow schema and the footers of its files (read once, used again by the append plan);
    raises when a file is unreadable or its schema differs from the others'."""
    fpath = inputs.final_file(cfg_name)
    found: dict[Path, Footer] = {}
    ref, ref_schema = None, None
    if fpath.is_file():
        try:
            ref = found[fpath] = read_footer(fpath)
            ref_schema = ref.md.schema.to_arrow_schema()
        except Exception as exc:  # noqa: BLE001
            raise corrupt_final(fpath, exc) from exc
    for p in inputs.staged[cfg_name]:
        try:
            f = found[p] = read_footer(p)
            if ref is not None and f.same_layout(ref):
                continue  # the same Parquet schema and metadata: the same Arrow schema
            s = f.md.schema.to_arrow_schema()
        except Exception as exc:  # noqa: BLE001
            raise corrupt_staged(p, exc) from exc
        if ref is None:
            ref, ref_schema = f, s
        elif _schema_key(s) != _schema_key(ref_schema):
            raise MergeError(
                f"schema mismatch for config {cfg_name!r} of split {inputs.split!r}: {p} has {_describe_schema(s)} "
                f"but {ref.path} has {_describe_schema(ref_schema)}. A split holds one model with one head dimension "
                "and vector dtype: write these rows to another split (output.split_name) or delete the "
                "mismatching files and rerun."
            )
    return ref_schema, found


def _schema_key(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, str(f.type)) for f in schema]


def _describe_schema(schema: pa.Schema) -> str:
    vec = schema.field("vector").type if "vector" in schema.names else None
    if isinstance(vec, pa.FixedSizeListType):
        v = f"vector {vec.value_type}[{vec.list_size}]"
    else:
        v = f"vector {vec}"
    return f"{v}; columns {', '.join(schema.names)}"
