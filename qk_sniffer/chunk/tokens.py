"""Tokenized shards shared by the sweep members that read one dataset with one tokenizer.

When a sweep holds several members whose dataset, tokenizer (as the config names it), ``max_length`` and
chunking (``num_chunks``, ``chunk_size``) agree, the Snakefile writes ``<member root>/.qk-sniffer/tokens.json``
naming a cache folder (``.qk-sniffer/tokens/`` of the working directory). ``sniff-chunk`` then looks its shard up there before
tokenizing: the entry's name is a hash of the shard's texts and example ids, the tokenizer's content (its
serialized rules and settings, not its path) and ``max_length``, so an entry is only ever used for exactly the
input it was made from. A lock per entry makes members that reach one shard at the same time tokenize it once:
the first writes the entry, the others read it. The workflow deletes the folder when it succeeds; a failed run
keeps it for the rerun. Slow (Python) tokenizers have no serialized form to compare and are never shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from ..layout import atomic_output
from .source import Shard, Tokenized, tokenize_shard

log = logging.getLogger("qk_sniffer")

# init arguments that say where a tokenizer was loaded from, not how it tokenizes
_WHERE = {"name_or_path", "_commit_hash", "cache_dir", "local_files_only", "revision", "token", "use_auth_token",
          "trust_remote_code", "_from_auto", "force_download", "proxies", "subfolder"}


def cache_for(config_path: str | Path) -> Path | None:
    """The shared cache named by the sidecar next to a member's effective config, or None."""
    sidecar = Path(config_path).parent / "tokens.json"
    try:
        return Path(json.loads(sidecar.read_text(encoding="utf-8"))["cache"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of how ``tokenizer`` tokenizes (None for a tokenizer without a serialized form)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    kwargs = {k: v for k, v in (getattr(tokenizer, "init_kwargs", None) or {}).items()
              if k not in _WHERE and not k.endswith("_file")}
    blob = json.dumps({"class": type(tokenizer).__name__, "backend": backend.to_str(), "init": kwargs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_key(shard: Shard, fingerprint: str, max_length: int) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps([fingerprint, max_length, shard.start, shard.stop, shard.total, len(shard.texts)]).encode())
    h.update(np.asarray(shard.example_ids, dtype=np.int64).tobytes())
    for text in shard.texts:
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else \
            text if isinstance(text, bytes) else repr(text).encode()
        h.update(type(text).__name__.encode() + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _write(path: Path, tok: Tokenized) -> None:
    lengths = np.array([len(s) for s in tok.ids], dtype=np.int64)
    flat = np.concatenate(tok.ids) if tok.ids else np.zeros(0, np.int64)
    if flat.size and 0 <= flat.min() and flat.max() < 2**31:
        flat = flat.astype(np.int32)  # half the disk; read back as int64
    with atomic_output(path) as fh:
        np.savez(fh, lengths=lengths, tokens=flat, example_ids=tok.example_ids,
                 skipped=np.array([tok.skipped_empty, tok.skipped_invalid], dtype=np.int64))


def _read(path: Path) -> Tokenized:
    with np.load(path) as z:
        lengths, flat = z["lengths"], z["tokens"].astype(np.int64)
        ids = np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []
        skipped = z["skipped"]
        return Tokenized(ids=list(ids), example_ids=z["example_ids"].astype(np.int64),
                         skipped_empty=int(skipped[0]), skipped_invalid=int(skipped[1]))


def tokenize_shared(cache: Path, shard: Shard, tokenizer, max_length: int) -> Tokenized:
    """:func:`qk_sniffer.chunk.source.tokenize_shard`, computed once per input among the members using ``cache``."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        log.info("tokens not shared: %s has no serialized form to compare", type(tokenizer).__name__)
        return tokenize_shard(shard, tokenizer, max_length)
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{shard_key(shard, fingerprint, max_length)}.npz"
    with FileLock(str(path.with_suffix(".lock"))):
        if path.is_file():
            try:
                tok = _read(path)
                log.info("tokens of %d examples read from the shared cache (%s): another sweep member tokenized "
                         "them", len(tok.ids), path.name)
                return tok
            except (OSError, ValueError, KeyError, IndexError) as exc:
                log.warning("shared tokens %s cannot be read (%s): tokenizing again", path, exc)
        tok = tokenize_shard(shard, tokenizer, max_length)
        _write(path, tok)
        log.info("tokenized %d examples and shared them with the other sweep members (%s)", len(tok.ids), path.name)
        return tok


def clear(cache: Path) -> None:
    """Remove the shared tokens (the workflow's success handler: every member has its chunks)."""
    shutil.rmtree(cache, ignore_errors=True)
