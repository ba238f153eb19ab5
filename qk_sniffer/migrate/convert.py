"""One config's files of the original tool -> a table in this project's row schema (layer/head/kind from the
config's name, fixed-size vectors), sorted by and unique on ``(example_id, position)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..chunk.writer import row_schema
from ..layout import parse_config_name
from .errors import NOTHING, MigrateError


def _cast(col, typ, path: Path, name: str, nulls: bool = False) -> pa.Array:
    if col.null_count and not nulls:
        raise MigrateError(f"{path}: column {name} holds {col.null_count:,} null value(s); {NOTHING}")
    try:
        out = pc.cast(col, typ)  # safe: a value that does not fit raises
        return out.combine_chunks() if isinstance(out, pa.ChunkedArray) else out
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise MigrateError(f"{path}: column {name} ({col.type}) does not fit {typ} ({exc}); {NOTHING}") from exc


def _vectors(col, path: Path) -> pa.FixedSizeListArray:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    t = col.type
    if col.null_count:
        raise MigrateError(f"{path}: {col.null_count:,} null vector(s); {NOTHING}")
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if len(lengths) != 1:
            raise MigrateError(f"{path}: vectors of different lengths ({', '.join(map(str, lengths[:4]))}); {NOTHING}")
        d = int(lengths[0])
    else:
        raise MigrateError(f"{path}: column vector is {t}, not a list of float32; {NOTHING}")
    values = col.flatten()
    if values.type not in (pa.float32(), pa.float16()) or d < 1:
        raise MigrateError(f"{path}: vectors of {values.type}[{d}], expected float32 (or float16); {NOTHING}")
    if values.null_count:
        raise MigrateError(f"{path}: {values.null_count:,} null value(s) inside vectors; {NOTHING}")
    return pa.FixedSizeListArray.from_arrays(values, d)


def _read_file(path: Path) -> dict:
    try:
        t = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001
        raise MigrateError(f"{path} is not readable Parquet ({type(exc).__name__}: {exc}); {NOTHING}") from exc
    n, names = t.num_rows, t.column_names
    out = {c: _cast(t.column(c), typ, path, c) for c, typ in
           (("bucket", pa.int32()), ("example_id", pa.int64()), ("position", pa.int32()))}
    if n and pc.min(out["position"]).as_py() < 0:
        raise MigrateError(f"{path}: negative positions; {NOTHING}")
    window = t.column("sliding_window") if "sliding_window" in names else pa.nulls(n, pa.int32())
    out["sliding_window"] = _cast(window, pa.int32(), path, "sliding_window", nulls=True)
    out["token_str"] = _cast(t.column("token_str"), pa.string(), path, "token_str", True) if "token_str" in names else None
    return {**out, "vector": _vectors(t.column("vector"), path), "rows": n}


def convert_config(files: list[Path], name: str, token: bool) -> tuple[pa.Table, dict]:
    """The rows of one config's source files in the dataset schema, sorted and unique on the key; and counts."""
    layer, head, kind = parse_config_name(name)
    parts = [p for p in (_read_file(f) for f in files) if p["rows"]]
    types = {(p["vector"].type.list_size, str(p["vector"].type.value_type)) for p in parts}
    if len(types) > 1:
        raise MigrateError(f"{files[0].parent}: its files hold vectors of different sizes or types ({sorted(types)}); "
                           f"{NOTHING}")
    d, dtype = types.pop()
    n = sum(p["rows"] for p in parts)
    cols = {c: pa.chunked_array([p[c] for p in parts]).combine_chunks()
            for c in ("bucket", "example_id", "position", "vector", "sliding_window")}
    if pc.count_distinct(cols["sliding_window"], mode="all").as_py() > 1:
        raise MigrateError(f"{files[0].parent}: sliding_window is not constant within the config; {NOTHING}")
    if token:
        cols["token_str"] = pa.chunked_array(
            [p["token_str"] if p["token_str"] is not None else pa.nulls(p["rows"], pa.string()) for p in parts],
            type=pa.string()).combine_chunks()
    ex, pos = cols["example_id"].to_numpy(), cols["position"].to_numpy()
    order = np.lexsort((pos, ex))  # stable: of rows sharing a key, the first in the files comes first
    ex, pos = ex[order], pos[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (ex[1:] != ex[:-1]) | (pos[1:] != pos[:-1])
    conflicts = 0
    if not first.all():
        flat = cols["vector"].flatten().to_numpy(zero_copy_only=False)
        vec = flat.view(np.uint16 if dtype == "halffloat" else np.uint32).reshape(n, d)[order]  # bitwise compare
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        dup = np.nonzero(~first)[0]
        conflicts = int((vec[dup] != vec[start[dup]]).any(axis=1).sum())
    keep = pa.array(order[first])
    schema = row_schema(d, "float16" if dtype == "halffloat" else "float32", token)
    m = len(keep)
    arrays = [cols[f.name].take(keep) for f in schema if f.name in cols]
    arrays += [pa.array(np.full(m, layer, np.int16)), pa.array(np.full(m, head, np.int16)), pa.array([kind] * m, pa.string())]
    table = pa.Table.from_arrays(arrays, schema=schema)
    buckets = dict(zip(*(v.tolist() for v in np.unique(table["bucket"].to_numpy(), return_counts=True))))
    return table, {"rows": m, "duplicates_dropped": n - m, "conflicting_duplicates": conflicts, "buckets": buckets}
