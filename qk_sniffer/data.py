"""Source dataset: loading through ``datasets.load_dataset``, contiguous shards, tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ConfigError
from .sampling import string_example_id


@dataclass
class Shard:
    """One contiguous shard of the (possibly ``max_samples``-truncated) split."""

    chunk: int
    num_chunks: int
    start: int  # global row index of the first example
    stop: int
    total: int  # rows in the split after max_samples
    texts: list = field(default_factory=list)
    example_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def shard_bounds(total: int, chunk: int, num_chunks: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``chunk`` of ``num_chunks`` (contiguous, sizes differ by at most one)."""
    return chunk * total // num_chunks, (chunk + 1) * total // num_chunks


def load_split(cfg: dict):
    import datasets

    d = cfg["dataset"]
    kwargs = {"split": d["split"]}
    if d.get("name"):
        kwargs["name"] = d["name"]
    if d.get("data_files") is not None:
        kwargs["data_files"] = d["data_files"]
    if d.get("revision"):
        kwargs["revision"] = d["revision"]
    try:
        try:
            ds = datasets.load_dataset(d["path"], **kwargs)
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
    col = d["text_column"]
    if col not in ds.column_names:
        raise ConfigError(
            f"dataset.text_column: column {col!r} is not in {d['path']!r} (columns: {', '.join(ds.column_names)}); "
            "set dataset.text_column to one of them"
        )
    if d.get("id_column") and d["id_column"] not in ds.column_names:
        raise ConfigError(
            f"dataset.id_column: column {d['id_column']!r} is not in {d['path']!r} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    if d.get("max_samples") is not None and d["max_samples"] < len(ds):
        ds = ds.select(range(d["max_samples"]))
    return ds


def example_ids_for(values, start: int, stop: int) -> np.ndarray:
    """Row indices, or the id column's values (integers as they are, strings hashed to 63 bits)."""
    if values is None:
        return np.arange(start, stop, dtype=np.int64)
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out[i] = int(v)
        elif isinstance(v, str):
            out[i] = string_example_id(v)
        else:
            raise ConfigError(f"dataset.id_column: value {v!r} at row {start + i} is neither an integer nor a string")
    return out


def load_shard(cfg: dict, chunk: int, num_chunks: int) -> Shard:
    if not 0 <= chunk < num_chunks:
        raise ConfigError(f"chunk {chunk} is out of range for workflow.num_chunks={num_chunks} (use 0..{num_chunks - 1})")
    ds = load_split(cfg)
    total = len(ds)
    start, stop = shard_bounds(total, chunk, num_chunks)
    part = ds.select(range(start, stop))
    texts = part[cfg["dataset"]["text_column"]] if stop > start else []
    id_col = cfg["dataset"].get("id_column")
    ids = example_ids_for(part[id_col] if (id_col and stop > start) else None, start, stop)
    return Shard(chunk=chunk, num_chunks=num_chunks, start=start, stop=stop, total=total, texts=list(texts), example_ids=ids)


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
