"""Preflight of ``dataset.*``: the split the run reads, its text column and its id column, checked locally.

:func:`check_source` loads the split as :mod:`qk_sniffer.chunk.source` does and refuses, with one line naming the
config key and the fix, what would otherwise fail (or silently lose rows) inside a chunk job: a missing split
or column, no rows, a text column that holds no text, and an ``id_column`` with nulls, values of mixed types
or repeated ids over the rows the run reads. Only the id column is read for the id checks (a second or two
per million rows). A stream (``dataset.streaming: true``) is never read whole: only its metadata (split sizes,
features: declared, or inferred by ``datasets`` from its first rows) and its first row are read, so its id checks
see the first row only (a null there, or features saying the ids mix types); repeats and later nulls in a stream
are not seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .chunk.source import _check_columns, _load_kwargs, _reading, example_ids_for, load_split
from .config import ConfigError

log = logging.getLogger("qk_sniffer")

TEXT_DTYPES = ("string", "large_string", "binary", "large_binary")
SHOWN = 5  # row indices named in a message


@dataclass
class SourceInfo:
    rows: int | None  # examples the run reads: min(max_samples, split length); None: a stream of unknown length
    split_rows: int | None  # rows in the split before max_samples (None: a stream without length metadata)
    columns: list[str] = field(default_factory=list)
    text_type: str = ""  # the text column's type ("string", "binary", ...; a stream without features: "str")
    id_type: str | None = None  # the id column's type (None without dataset.id_column)
    streaming: bool = False
    ids_checked: int = 0  # rows whose ids were checked: all rows read, the first row of a stream, 0 without ids


def _where(d: dict) -> str:
    files = d.get("data_files")
    return f"{d['path']!r}" + (f" ({files})" if files else "")


def _no_rows(d: dict) -> ConfigError:
    return ConfigError(f"dataset.split: split {d['split']!r} of {_where(d)} has no rows; point dataset.path / "
                       "dataset.data_files at data with rows, or choose another dataset.split")


def _is_empty(exc: BaseException) -> bool:
    """Whether what ``datasets`` raised while loading means the split has no rows."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # the json builder's empty file, a split without files or rows, pyarrow's zero-row row group
        if isinstance(exc, StopIteration) or any(m in str(exc) for m in ("corresponds to no data", "BatchSize must be")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(feature) -> str:
    """A ``datasets`` feature as a short type name: ``int64``, ``list of string``, ``struct {a: int64}``, ``json``."""
    from datasets import ClassLabel, Json, Value

    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, Json):
        return "json (values of mixed types)"
    if isinstance(feature, ClassLabel):
        return "class label (int64)"
    if isinstance(feature, dict):
        return "struct {" + ", ".join(f"{k}: {describe(v)}" for k, v in feature.items()) + "}"
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"list of {describe(inner)}"
    return type(feature).__name__


def _check_text(d: dict, feature, first_value=None) -> str:
    """The text column's type; a column that cannot hold text is refused."""
    from datasets import Value

    col = d["text_column"]
    if feature is not None:
        name = describe(feature)
        ok = isinstance(feature, Value) and feature.dtype in TEXT_DTYPES
    else:  # a stream without features: the first row's value
        name = type(first_value).__name__
        ok = first_value is None or isinstance(first_value, str | bytes)
    if not ok:
        where = "its first row holds" if feature is None else "it holds"
        raise ConfigError(
            f"dataset.text_column: column {col!r} of {_where(d)} is not text: {where} {name} (text columns are "
            f"{', '.join(TEXT_DTYPES)}); set dataset.text_column to the column holding the texts"
        )
    return name


def _rows_list(rows: np.ndarray, total: int | None = None) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:SHOWN])
    more = (total if total is not None else len(rows)) - SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _example_ids(ds, arr, col: str):
    """(python values or None, example ids) of the id column ``arr``, as data.load_shard maps them."""
    import pyarrow as pa

    t = arr.type
    if pa.types.is_boolean(t) or (pa.types.is_integer(t) and (pa.types.is_signed_integer(t) or t.bit_width <= 32)):
        return None, np.asarray(arr.to_numpy(), dtype=np.int64)  # data.example_id_of maps these to themselves
    values = ds.features.decode_column(arr.to_pylist(), col)  # the values data.load_shard reads (Json decoded)
    return values, example_ids_for(values, 0, len(values))


def check_ids(d: dict, ds) -> None:
    """Refuse nulls, mixed value types and repeated example ids in ``dataset.id_column`` over all rows of ``ds``."""
    import pyarrow.compute as pc
    from datasets import Value

    col, n = d["id_column"], len(ds)
    fix = "pick another id column, or remove dataset.id_column to use row indices"
    arr = ds.with_format("arrow")[col]  # only this column is read
    if arr.null_count:
        rows = np.flatnonzero(pc.is_null(arr).to_numpy(zero_copy_only=False))
        raise ConfigError(f"dataset.id_column: column {col!r} has {arr.null_count} null value(s) in the {n} rows the "
                          f"run reads (rows {_rows_list(rows)}); fill them, {fix}")
    values, ids = _example_ids(ds, arr, col)
    if values is not None and not isinstance(ds.features[col], Value):  # an Arrow-typed column holds one type
        first: dict[str, int] = {}
        for i, v in enumerate(values):
            first.setdefault(type(v).__name__, i)
        if len(first) > 1:
            (a, ra), (b, rb) = sorted(first.items(), key=lambda kv: kv[1])[:2]
            raise ConfigError(
                f"dataset.id_column: column {col!r} mixes value types ({', '.join(first)}): row {ra} holds the {a} "
                f"{values[ra]!r}, row {rb} the {b} {values[rb]!r}; store every id with one type, {fix}"
            )
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if len(uniq) == n:
        return
    first_row = int(np.flatnonzero(counts[inverse] > 1)[0])
    rows = np.flatnonzero(ids == ids[first_row])
    originals = list(dict.fromkeys(repr(values[i] if values is not None else arr[int(i)].as_py()) for i in rows[:SHOWN]))
    what = (f"id {originals[0]} is repeated" if len(originals) == 1 else
            f"the values {', '.join(originals)} map to one example id ({int(ids[first_row])})")
    n_ids, extra = int((counts > 1).sum()), int((counts[counts > 1] - 1).sum())
    raise ConfigError(
        f"dataset.id_column: in column {col!r} {what} in rows {_rows_list(rows)} ({n_ids} repeated id(s), {extra} "
        f"row(s) too many in the {n} rows the run reads); the merge keeps one row per (example_id, position), so "
        "texts sharing an id would lose rows silently: pick another id column, deduplicate the source, or remove "
        "dataset.id_column to use row indices"
    )


def _check_stream(cfg: dict) -> SourceInfo:
    import datasets

    d = cfg["dataset"]
    try:
        with _reading(d):
            ds = datasets.load_dataset(d["path"], streaming=True, **_load_kwargs(d))
            first = next(iter(ds.take(1)), None)
    except ConfigError as exc:
        if _is_empty(exc):
            raise _no_rows(d) from exc
        raise
    columns = list(ds.column_names or (first or {}))
    if first is None:
        raise _no_rows(d)
    _check_columns(d, columns)
    split = ds.info.splits.get(d["split"]) if ds.info and ds.info.splits else None
    known = split.num_examples if split is not None and split.num_examples else None
    rows = min(x for x in (known, d.get("max_samples")) if x is not None) if (known or d.get("max_samples")) else None
    features = ds.features
    text_col, id_col = d["text_column"], d.get("id_column")
    text_type = _check_text(d, features[text_col] if features else None, first[text_col])
    id_type = None
    if id_col:
        if first[id_col] is None:
            raise ConfigError(f"dataset.id_column: column {id_col!r} is null in row 0 of the stream {_where(d)}; fill "
                              "it, pick another id column, or remove dataset.id_column to use row indices")
        id_type = describe(features[id_col]) if features else type(first[id_col]).__name__
        if id_type.startswith("json"):
            raise ConfigError(f"dataset.id_column: column {id_col!r} of the stream {_where(d)} mixes value types (its "
                              "features say json); store every id with one type, pick another id column, or remove "
                              "dataset.id_column to use row indices")
        log.info("dataset.id_column: %r of a stream: the first row's id is checked, not the whole stream's", id_col)
    return SourceInfo(rows=rows, split_rows=known, columns=columns, text_type=text_type, id_type=id_type,
                      streaming=True, ids_checked=1 if id_col else 0)


def check_source(cfg: dict) -> SourceInfo:
    """Load ``cfg``'s split as the run will (a stream: its metadata and first row) and check it; see the module doc."""
    d = cfg["dataset"]
    if d.get("streaming"):
        return _check_stream(cfg)
    try:
        ds = load_split(cfg)
    except ConfigError as exc:
        if _is_empty(exc):
            raise _no_rows(d) from exc
        raise
    rows = len(ds)
    if rows == 0:
        raise _no_rows(d)
    info = ds.info.splits.get(d["split"]) if ds.info and ds.info.splits else None
    split_rows = info.num_examples if info is not None and info.num_examples else None
    text_type = _check_text(d, ds.features[d["text_column"]])
    id_col = d.get("id_column")
    id_type = None
    if id_col:
        id_type = describe(ds.features[id_col])
        check_ids(d, ds)
    return SourceInfo(rows=rows, split_rows=split_rows or (None if d.get("max_samples") else rows),
                      columns=list(ds.column_names), text_type=text_type, id_type=id_type, streaming=False,
                      ids_checked=rows if id_col else 0)
