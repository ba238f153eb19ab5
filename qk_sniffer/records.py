"""The two JSON records a data root keeps, as typed values: a chunk's manifest
(``staging/chunk-<i>/manifest.json``, :class:`ChunkManifest`) and the record of the latest merge
(``final/.merged.json``, :class:`MergeRecord`). README.md, "What you get", describes both files.

Each record carries ``schema_version``. Reading one (``from_json``) checks the types of what it holds,
fills the fields a record written by an earlier qk-sniffer lacks with their defaults, drops keys no
longer written (an earlier manifest's per-file ``summaries``), and refuses a record of a newer schema
with one line; writing (``to_json``) gives the dict stored as JSON. Nested records (the model, the
dataset, timings, the run summary) stay plain mappings: they are written and displayed, not decided on.

Versions: manifests and merge records without ``schema_version`` are version 1; version 2 added the
field and dropped the manifests' per-file ``summaries``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QkSnifferError

MANIFEST_VERSION = 2
MERGE_RECORD_VERSION = 2


class RecordError(QkSnifferError, ValueError):
    """A manifest or merge record that cannot be read as one: ``where`` (the file) and ``what`` is wrong with it."""

    def __init__(self, where: str | Path, what: str):
        super().__init__(f"{where} {what}")
        self.where, self.what = str(where), what


def utc_now() -> str:
    """The current UTC time as every record of the project writes it (``2024-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_KINDS = {int: "an integer", str: "a string", float: "a number", dict: "a mapping", list: "a list", bool: "a boolean"}


def _check(value: Any, kind: type, name: str, where: str, optional: bool) -> Any:
    """``value`` when it is of ``kind`` (None allowed when ``optional``; an int where a float goes is a float)."""
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RecordError(where, f"records {name} as {type(value).__name__} {value!r}, not {_KINDS[kind]}")


@functools.cache
def _field_kinds(cls) -> dict[str, tuple[type, bool]]:
    """Per field of the record dataclass ``cls``, from its annotation: the JSON kind (``dict[str, int]`` -> dict)
    and whether it may be null (``X | None``)."""
    kinds = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
        kinds[name] = (typing.get_origin(args[0]) or args[0], isinstance(hint, types.UnionType))
    return kinds


def _read(cls, data: Any, where: str, version: int):
    """An instance of the record dataclass ``cls`` from the parsed JSON ``data``, each field checked against its
    annotation; a field missing from ``data`` takes its default (required when it has none)."""
    kinds = _field_kinds(cls)
    if not isinstance(data, dict):
        raise RecordError(where, f"holds a JSON {type(data).__name__}, not an object")
    got = _check(data.get("schema_version", 1), int, "schema_version", where, False)
    if got > version:
        raise RecordError(where, f"was written by a newer qk-sniffer (schema_version {got}; this one reads up to "
                                 f"{version}): upgrade qk-sniffer")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "schema_version":
            continue
        if f.name not in data or (data[f.name] is None and not kinds[f.name][1]):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(where, f"has no {f.name}")
            continue
        kind, optional = kinds[f.name]
        values[f.name] = _check(data[f.name], kind, f.name, where, optional)
    return cls(**values)


def _mapping_of(value: dict, kind: type, name: str, where: str) -> dict:
    for k, v in value.items():
        _check(v, kind, f"{name}[{k!r}]", where, False)
    return value


# -- staging/chunk-<i>/manifest.json ---------------------------------------------------------------


@dataclass
class ChunkManifest:
    """What one finished sniff-chunk run wrote and what it ran with; written last, so it marks the chunk complete."""

    chunk: int
    split: str
    config_fingerprint: str
    rows: dict[str, int]  # config name -> rows captured (0 for a config with none)
    files: dict[str, str]  # config name -> its file, relative to the chunk dir (configs with rows only)
    example_range: list | None = None  # [start, stop) of the dataset's examples
    chunk_size: int | None = None
    examples: int = 0
    skipped_empty: int = 0
    skipped_invalid: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    fingerprint_inputs: dict | None = None  # the settings the fingerprint hashes (to say which one changed)
    sampling: dict | None = None
    model: dict = field(default_factory=dict)
    dataset: dict = field(default_factory=dict)
    device: str | None = None
    slurm_job_id: str | None = None
    versions: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    segments: int = 1
    resumed: dict | None = None
    num_chunks: int | None = None  # written by manifests of version 1 only: their fingerprint hashed it
    schema_version: int = MANIFEST_VERSION


    @property
    def total_rows(self) -> int:
        return int(sum(self.rows.values()))

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> ChunkManifest:
        where = str(where)
        m = _read(cls, data, where, MANIFEST_VERSION)
        _mapping_of(m.rows, int, "rows", where)
        _mapping_of(m.files, str, "files", where)
        if m.example_range is not None and len(m.example_range) != 2:
            raise RecordError(where, f"records example_range as {m.example_range!r}, not [start, stop]")
        return m

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        if out["num_chunks"] is None:
            del out["num_chunks"]
        return out


def _load(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(path, f"is not readable JSON ({exc})") from exc


def read_manifest(path: Path) -> ChunkManifest:
    """The manifest at ``path``; :class:`RecordError` names the file when it is not readable JSON or not a manifest."""
    return ChunkManifest.from_json(_load(path), path)


# -- final/.merged.json ----------------------------------------------------------------------------


@dataclass
class MergeRecord:
    """What the latest merge did, for one split: rows added and in total per config, which way each touched config
    was written, conflicts and rounding differences, rows per bucket, the chunks merged and a summary of their run."""

    split: str
    merged_at: str | None = None
    config_fingerprint: str | None = None
    sampling: dict | None = None
    mixed_sampling: dict | None = None  # {"recorded": ..., "recorded_in": ...} when appended with other settings
    configs_touched: list = field(default_factory=list)
    methods: dict = field(default_factory=dict)  # {"append": n, "rewrite": n}
    rows_added: dict = field(default_factory=dict)
    rows_added_total: int = 0
    rows_total: dict = field(default_factory=dict)
    rows_split_total: int = 0
    configs: int = 0
    conflicts: dict = field(default_factory=dict)
    conflicts_total: int = 0
    rounding_differences: dict = field(default_factory=dict)
    rounding_differences_total: int = 0
    rounding_max_relative_difference: float = 0.0
    rounding_tolerance: dict = field(default_factory=dict)
    chunks: list = field(default_factory=list)
    incomplete_chunks: list = field(default_factory=list)
    run: dict | None = None  # model, dataset, sampling, devices and summed timings of the chunks merged
    buckets: dict = field(default_factory=dict)  # kind -> bucket (a string) -> rows
    merge_s: float | None = None
    schema_version: int = MERGE_RECORD_VERSION


    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> MergeRecord:
        where = str(where)
        m = _read(cls, data, where, MERGE_RECORD_VERSION)
        _mapping_of(m.rows_total, int, "rows_total", where)
        for kind, per in m.buckets.items():
            _mapping_of(_check(per, dict, f"buckets[{kind!r}]", where, False), int, f"buckets[{kind!r}]", where)
        return m

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def read_merge_record(path: Path) -> MergeRecord:
    """``final/.merged.json`` at ``path``; :class:`RecordError` names the file when it cannot be read as one."""
    return MergeRecord.from_json(_load(path), path)
