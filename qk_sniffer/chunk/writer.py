"""Background Parquet writer of a chunk's segments: one file per capture config, memory bounded by a byte budget."""

from __future__ import annotations

import os
import queue
import resource
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..layout import DiskFullError, config_name, data_file, disk_full_errno

_DONE = object()
FULL_HINT = ("the chunk stopped without its manifest and removed what it was writing; free space there and run the "
             "chunk again (it resumes from its last checkpoint, if it made one)")


def row_schema(head_dim: int, vector_dtype: str = "float32", token_strings: bool = False) -> pa.Schema:
    """The dataset schema (README.md, "What you get")."""
    value = pa.float16() if vector_dtype == "float16" else pa.float32()
    fields = [
        pa.field("bucket", pa.int32(), nullable=False),
        pa.field("example_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.field("item", value), head_dim), nullable=False),
        pa.field("sliding_window", pa.int32(), nullable=True),
    ]
    if token_strings:
        fields.append(pa.field("token_str", pa.string(), nullable=True))
    fields += [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("head", pa.int16(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
    ]
    return pa.schema(fields)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < min(wanted, target):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(wanted, soft), target), hard))


class ChunkWriter:
    """Streams captured batches into ``<out>/data/<split>/<config>/data.parquet``.

    Files are written under a temporary name and renamed by :meth:`close`; the caller writes
    the chunk manifest after that, so a chunk without a manifest is incomplete.
    """

    def __init__(self, out_dir: Path, split: str, *, head_dim: int, n_layers: int, n_heads: int,
                 vector_dtype: str = "float32", token_strings: bool = False, token_table: list[str] | None = None,
                 buffer_bytes: int = 256 << 20, max_queue: int = 2, n_configs_hint: int = 0):
        self.out_dir = Path(out_dir)
        self.split = split
        self.schema = row_schema(head_dim, vector_dtype, token_strings)
        self.head_dim = head_dim
        self.n_layers, self.n_heads = n_layers, n_heads
        self.token_table = token_table
        self.token_strings = token_strings
        self.buffer_bytes = buffer_bytes
        self._buffers: dict[str, dict] = {}  # config -> its key columns and buffered numpy parts
        self._buffered = 0
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._tmp: dict[str, Path] = {}
        self.rows: dict[str, int] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._error: BaseException | None = None
        self._aborted = False
        _raise_fd_limit(n_configs_hint + 256)
        self._thread = threading.Thread(target=self._run, name="qk-sniffer-writer", daemon=True)
        self._thread.start()

    # -- producer side ------------------------------------------------------------------------
    def put(self, batch) -> None:
        self._check()
        self._queue.put(batch)

    def close(self) -> dict[str, int]:
        """Drain the queue, flush, close and rename every file; return rows per config."""
        self._queue.put(_DONE)
        self._thread.join()
        self._check()
        for name, writer in self._writers.items():
            try:
                writer.close()
            except OSError as exc:
                self._raise_if_full(exc, name)
                raise
        for name, tmp in self._tmp.items():
            os.replace(tmp, data_file(self.out_dir, self.split, name))
        return dict(self.rows)

    def abort(self) -> None:
        """Stop without renaming anything into place (temporary files are removed). Waits for the writer thread,
        which skips whatever is still queued, so that nothing writes into the directory after this returns."""
        self._aborted = True
        if self._thread.is_alive():
            self._queue.put(_DONE)  # never blocks for long: once aborted, the thread only drains the queue
            self._thread.join()
        for writer in self._writers.values():
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)

    def _check(self) -> None:
        if isinstance(self._error, DiskFullError):
            raise DiskFullError(self._error.path, self._error.errno, self._error.hint) from self._error
        if self._error is not None:
            raise RuntimeError(f"the Parquet writer failed: {self._error}") from self._error

    def _raise_if_full(self, exc: BaseException, name: str) -> None:
        """A full disk (or quota) while writing config ``name``: one line naming its file (DiskFullError)."""
        code = disk_full_errno(exc)
        if code is not None:
            raise DiskFullError(data_file(self.out_dir, self.split, name), code, FULL_HINT) from exc

    # -- writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _DONE:
                break
            if self._error is None and not self._aborted:  # after a failure keep draining: the producer never blocks
                try:
                    self._consume(item)
                except BaseException as exc:  # noqa: BLE001 - surfaced by _check
                    self._error = exc
        if self._error is None and not self._aborted:
            try:
                self._flush_all()
            except BaseException as exc:  # noqa: BLE001
                self._error = exc

    def _consume(self, batch) -> None:
        batch.wait()
        tokens = batch.token_ids
        for layer, kind, plan, tensor, window in batch.items:
            arr = tensor.numpy()
            if plan.size == 0:
                continue
            tok = None
            if self.token_strings and tokens is not None:
                ids = tokens[plan.host_rows, plan.host_cols]
                tok = np.asarray(self.token_table, dtype=object)[ids]
            if plan.per_head:
                order = plan.row_head
                for head in plan.heads:
                    sel = np.nonzero(order == head)[0]
                    if len(sel) == 0:
                        continue
                    self._add(layer, head, kind, arr[sel], plan.bucket[sel], plan.example_id[sel],
                              plan.position[sel], window, None if tok is None else tok[sel])
            else:
                for j, head in enumerate(plan.heads):
                    self._add(layer, head, kind, arr[:, j, :], plan.bucket, plan.example_id, plan.position,
                              window, tok)
        if self._buffered >= self.buffer_bytes:
            self._flush_all()

    def _add(self, layer, head, kind, vectors, bucket, example_id, position, window, tok) -> None:
        """Buffer one batch's rows of one config as numpy arrays (Arrow is built once per config at a flush:
        the per-batch work in this thread stays small, since it holds the GIL the forward pass also needs)."""
        name = config_name(layer, head, kind, self.n_layers, self.n_heads)
        part = (np.ascontiguousarray(vectors), bucket, example_id, position, tok)
        entry = self._buffers.get(name)
        if entry is None:
            entry = self._buffers[name] = {"key": (layer, head, kind, window), "parts": []}
        entry["parts"].append(part)
        n = vectors.shape[0]
        # what these parts hold (key arrays shared by a batch's heads are counted for each: the budget errs low)
        self._buffered += sum(a.nbytes for a in part[:4]) + (0 if tok is None else tok.nbytes)
        self.rows[name] = self.rows.get(name, 0) + n

    def _table(self, key: tuple, parts: list[tuple]) -> pa.Table:
        layer, head, kind, window = key
        vectors = np.concatenate([p[0] for p in parts]).reshape(-1)
        n = sum(len(p[1]) for p in parts)
        cols = [
            pa.array(np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False)),
            pa.array(np.concatenate([p[2] for p in parts]).astype(np.int64, copy=False)),
            pa.array(np.concatenate([p[3] for p in parts]).astype(np.int32, copy=False)),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors, type=self.schema.field("vector").type.value_type),
                                              self.head_dim),
            pa.nulls(n, pa.int32()) if window is None else pa.repeat(pa.scalar(window, pa.int32()), n),
        ]
        if self.token_strings:
            toks = [p[4] if p[4] is not None else np.full(len(p[1]), None, dtype=object) for p in parts]
            cols.append(pa.array(np.concatenate(toks), type=pa.string()))
        cols += [
            pa.repeat(pa.scalar(layer, pa.int16()), n),
            pa.repeat(pa.scalar(head, pa.int16()), n),
            pa.repeat(pa.scalar(kind, pa.string()), n),
        ]
        return pa.Table.from_arrays(cols, schema=self.schema)

    def _flush_all(self) -> None:
        for name, entry in self._buffers.items():
            if not entry["parts"]:
                continue
            parts, entry["parts"] = entry["parts"], []  # freed as soon as written: memory falls during a flush
            try:
                self._writer(name).write_table(self._table(entry["key"], parts))
            except OSError as exc:
                self._raise_if_full(exc, name)
                raise
            del parts
        self._buffers = {}
        self._buffered = 0

    def _writer(self, name: str) -> pq.ParquetWriter:
        writer = self._writers.get(name)
        if writer is None:
            final = data_file(self.out_dir, self.split, name)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._tmp[name] = final.with_name(f".{final.name}.tmp-{os.getpid()}")  # abort removes it
            # segments are read back once, at the chunk's end: a fast codec, and no dictionary for float
            # vectors (they never repeat); the chunk's final files are written in the dataset's format
            writer = pq.ParquetWriter(tmp, self.schema, compression="lz4", write_page_checksum=True,
                                      use_dictionary=[n for n in self.schema.names if n != "vector"])
            self._writers[name] = writer
        return writer
