"""Source dataset: loading through ``datasets.load_dataset``, contiguous shards, tokenization."""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@dataclass
class Shard:
    """The examples ``[start, stop)`` of the split (after ``max_samples``) one chunk holds."""

    chunk: int
    start: int  # global row index of the first example
    stop: int
    total: int | None  # rows in the split after max_samples (None: a stream of unknown length)
    texts: list = field(default_factory=list)
    example_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _load_kwargs(d: dict) -> dict:
    kwargs = {"split": d["split"]}
    if d.get("name"):
        kwargs["name"] = d["name"]
    if d.get("data_files") is not None:
        kwargs["data_files"] = d["data_files"]
    if d.get("revision"):
        kwargs["revision"] = d["revision"]
    return kwargs


@contextmanager
def _reading(d: dict):
    """Turn what ``datasets`` raises while loading (or streaming) the source into one-line config errors."""
    import datasets

    try:
        try:
            yield
        except datasets.exceptions.DatasetGenerationError as exc:  # the builder's own error is the cause
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, UnicodeDecodeError | StopIteration):
                raise cause from exc
            raise ConfigError(f"dataset: could not read {d.get('data_files') or d['path']!r}: {cause or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"dataset.data_files: {d.get('data_files') or d['path']!r} is not valid UTF-8 ({exc}); re-encode the file "
            "as UTF-8, or store the texts in a Parquet binary column (rows that are not UTF-8 are then skipped and "
            "counted)"
        ) from exc
    except ValueError as exc:
        msg = str(exc)
        if "split" in msg.lower() or "Unknown split" in msg:
            raise ConfigError(f"dataset.split: {d['split']!r} is not a split of {d['path']!r}: {msg}") from exc
        raise ConfigError(f"dataset: could not load {d['path']!r}: {msg}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"dataset.path/data_files: {exc}; check the path (relative to the working directory)") from exc
    except StopIteration as exc:  # what the json builder raises for an empty file
        raise ConfigError(f"dataset: {d['path']!r} {d.get('data_files') or ''} has no rows") from exc


def _check_columns(d: dict, columns: list[str]) -> None:
    col = d["text_column"]
    if col not in columns:
        raise ConfigError(
            f"dataset.text_column: column {col!r} is not in {d['path']!r} (columns: {', '.join(columns)}); "
            "set dataset.text_column to one of them"
        )
    if d.get("id_column") and d["id_column"] not in columns:
        raise ConfigError(
            f"dataset.id_column: column {d['id_column']!r} is not in {d['path']!r} (columns: {', '.join(columns)})"
        )


def load_split(cfg: dict):
    import datasets

    d = cfg["dataset"]
    with _reading(d):
        ds = datasets.load_dataset(d["path"], **_load_kwargs(d))
    _check_columns(d, ds.column_names)
    if d.get("max_samples") is not None and d["max_samples"] < len(ds):
        ds = ds.select(range(d["max_samples"]))
    return ds


def example_id_of(value) -> int:
    """The example id of one id-column value, as the original tool computed it.

    Booleans and integers within int64 are used as they are, integer-valued floats as integers; anything
    else (strings, floats with a fraction, values out of range, nulls) is ``blake2b(str(value), 8 bytes)``
    read little-endian as a signed int64.
    """
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, int | np.integer) and INT64_MIN <= int(value) <= INT64_MAX:
        return int(value)
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer() \
            and INT64_MIN <= int(value) <= INT64_MAX:
        return int(value)
    digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def example_ids_for(values, start: int, stop: int) -> np.ndarray:
    """Row indices, or the example ids of the id column's values (:func:`example_id_of`)."""
    if values is None:
        return np.arange(start, stop, dtype=np.int64)
    return np.fromiter((example_id_of(v) for v in values), dtype=np.int64, count=len(values))


def _stream_shard(cfg: dict, chunk: int, start: int, stop: int | None) -> Shard:
    """Examples ``[start, stop)`` read from a stream: skip to the first, take them, nothing else is downloaded."""
    import datasets

    d = cfg["dataset"]
    with _reading(d):
        ds = datasets.load_dataset(d["path"], streaming=True, **_load_kwargs(d))
        columns = ds.column_names or list(next(iter(ds.take(1)), {}))
    if not columns:
        raise ConfigError(f"dataset: {d['path']!r} {d.get('data_files') or ''} has no rows")
    _check_columns(d, columns)
    info = ds.info.splits.get(d["split"]) if ds.info and ds.info.splits else None
    known = info.num_examples if info is not None and info.num_examples else None
    total = min(x for x in (known, d.get("max_samples")) if x is not None) if (known or d.get("max_samples")) else None
    part = ds.skip(start) if start else ds
    if stop is not None:
        part = part.take(stop - start)
    text_col, id_col = d["text_column"], d.get("id_column")
    texts, values = [], []
    with _reading(d):
        for row in part:
            texts.append(row[text_col])
            if id_col:
                values.append(row[id_col])
    if stop is None:  # a stream of unknown length read to its end: now its length is known
        stop = start + len(texts)
        total = stop if total is None else total
    # a stream shorter than max_samples leaves this chunk short or empty (its range stays as planned)
    ids = example_ids_for(values if id_col else None, start, start + len(texts))
    return Shard(chunk=chunk, start=start, stop=stop, total=total, texts=texts, example_ids=ids)


def load_shard(cfg: dict, chunk: int, start: int, stop: int | None) -> Shard:
    """Chunk ``chunk``'s examples ``[start, stop)`` (``stop`` None: to the end of a stream of unknown length)."""
    if cfg["dataset"].get("streaming"):
        return _stream_shard(cfg, chunk, start, stop)
    ds = load_split(cfg)
    total = len(ds)
    stop = total if stop is None else stop
    if stop > total:
        raise ConfigError(f"dataset: {cfg['dataset']['path']!r} has {total} rows (after dataset.max_samples), fewer "
                          f"than chunk {chunk}'s examples [{start}, {stop}); the source shrank since the run was "
                          "planned: rerun snakemake")
    part = ds.select(range(start, stop))
    texts = part[cfg["dataset"]["text_column"]] if stop > start else []
    id_col = cfg["dataset"].get("id_column")
    ids = example_ids_for(part[id_col] if (id_col and stop > start) else None, start, stop)
    return Shard(chunk=chunk, start=start, stop=stop, total=total, texts=list(texts), example_ids=ids)


def count_examples(cfg: dict) -> int | None:
    """Examples a run reads: the split's rows after ``max_samples`` (None: a stream of unknown length)."""
    d = cfg["dataset"]
    if not d.get("streaming"):
        return len(load_split(cfg))
    import datasets

    with _reading(d):
        ds = datasets.load_dataset(d["path"], streaming=True, **_load_kwargs(d))
    info = ds.info.splits.get(d["split"]) if ds.info and ds.info.splits else None
    known = info.num_examples if info is not None and info.num_examples else None
    sizes = [x for x in (known, d.get("max_samples")) if x is not None]
    return min(sizes) if sizes else None


@dataclass
class Tokenized:
    ids: list  # list of 1-D int arrays (unpadded, truncated)
    example_ids: np.ndarray
    skipped_empty: int
    skipped_invalid: int


def tokenize_shard(shard: Shard, tokenizer, max_length: int) -> Tokenized:
    """Tokenize with truncation; empty or non-text rows are skipped and counted."""
    keep_texts, keep_ids = [], []
    empty = invalid = 0
    for text, eid in zip(shard.texts, shard.example_ids):
        if isinstance(text, bytes):  # a binary column: use the rows that are UTF-8, count the others
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
                continue
        if not isinstance(text, str):
            invalid += 1
            continue
        if not text.strip():
            empty += 1
            continue
        keep_texts.append(text)
        keep_ids.append(eid)
    seqs: list = []
    if keep_texts:
        enc = tokenizer(keep_texts, truncation=True, max_length=max_length, add_special_tokens=True)
        seqs = [np.asarray(x, dtype=np.int64) for x in enc["input_ids"]]
    # a text whose tokenization is empty carries nothing to capture
    out_ids, out_eids = [], []
    for s, e in zip(seqs, keep_ids):
        if len(s) == 0:
            empty += 1
            continue
        out_ids.append(s)
        out_eids.append(e)
    return Tokenized(ids=out_ids, example_ids=np.asarray(out_eids, dtype=np.int64), skipped_empty=empty,
                     skipped_invalid=invalid)


PADDING_SLACK_TOKENS = 1024  # a row joins a batch while it is at most this many tokens (or 1/8 of the longest) shorter


def length_sorted_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Indices grouped into batches of similar length (longest first, so memory peaks early).

    A row joins the current batch only while its padding stays small: at most 1/8 of the batch's
    longest row or ``PADDING_SLACK_TOKENS``, whichever is more. Short rows still batch freely; at long
    contexts a row much shorter than the batch's longest starts a batch of its own, so a padded batch
    costs about what its rows cost alone (padding is computed like real tokens). A pure function of
    the lengths: a resumed chunk's pending tail, which starts at a batch boundary, batches the same.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start >= batch_size or \
                lengths[order[start]] - lengths[order[i]] > max(PADDING_SLACK_TOKENS, lengths[order[start]] // 8):
            batches.append(order[start:i])
            start = i
    return batches
