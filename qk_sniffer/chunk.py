"""``sniff-chunk``: run the model over one dataset shard and stage its captures."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .capture import CapturedBatch, Sniffer, StopForward, to_device
from .config import ConfigError, chunk_fingerprint, data_root, sampling_settings, split_name
from .data import length_sorted_batches, load_shard, tokenize_shard
from .layout import atomic_write_json, chunk_dir, config_name, manifest_path
from .modeling import (
    DTYPES,
    attention_modules,
    backbone_of,
    head_counts,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_capture,
    text_config,
)
from .progress import ChunkProgress, Segment
from .writer import ChunkWriter

log = logging.getLogger("qk_sniffer")


class Capturer:
    """Runs batches through the backbone with a sniffer attached; no LM head, early exit."""

    def __init__(self, model, spec, *, pad_id: int = 0, padding_side: str = "right", autocast_dtype=None):
        self.model = model
        self.backbone = backbone_of(model)
        mods = attention_modules(self.backbone)
        missing = [layer for layer in spec.layers if layer not in mods]
        if missing:
            raise ConfigError(f"capture.layers: the model has no attention module for layers {missing}")
        self.input_device = self.backbone.get_input_embeddings().weight.device
        self.sniffer = Sniffer(spec, device=self.input_device)
        self.sniffer.attach(mods)
        self.pad_id = pad_id
        self.padding_side = padding_side
        self.autocast_dtype = autocast_dtype

    def close(self) -> None:
        self.sniffer.remove_hooks()
        self.sniffer.deactivate()

    def run_batch(self, seqs: list, example_ids) -> CapturedBatch:
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        offsets = (width - lengths) if self.padding_side == "left" else np.zeros_like(lengths)
        for i, (s, off) in enumerate(zip(seqs, offsets)):
            ids[i, off:off + len(s)] = s
            mask[i, off:off + len(s)] = 1
        # positions exclude padding: the first real token of every row is position 0
        pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        dev = self.input_device
        self.sniffer.begin_batch(example_ids, lengths, offsets, token_ids=ids)
        width_shape = ids.shape
        t_ids, t_mask, t_pos = (t.view(width_shape) for t in to_device([ids.ravel(), mask.ravel(), pos.ravel()], dev))
        ac = (torch.autocast(device_type=dev.type, dtype=self.autocast_dtype)
              if self.autocast_dtype is not None else nullcontext())
        with self.sniffer, torch.inference_mode(), ac:
            try:
                self.backbone(input_ids=t_ids, attention_mask=t_mask, position_ids=t_pos, use_cache=False)
            except StopForward:
                pass
        batch = self.sniffer.end_batch()
        if batch.missing_layers:
            raise RuntimeError(
                f"layers {batch.missing_layers} never reached the capture code: {type(self.model).__name__} bypasses "
                "transformers' attention interface there; add an adapter under models/ (see models/README.md)"
            )
        return batch


def _versions() -> dict:
    import datasets
    import pyarrow
    import transformers

    return {
        "qk_sniffer": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "datasets": datasets.__version__, "pyarrow": pyarrow.__version__,
    }


def _progress(total_examples: int):
    from tqdm import tqdm

    return tqdm(total=total_examples, unit="ex", desc="sniff", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0)


def run_chunk(cfg: dict, chunk: int, num_chunks: int | None = None, root: Path | None = None) -> dict:
    """Capture shard ``chunk`` into ``staging/chunk-<chunk>/``; write its manifest last."""
    t0 = time.perf_counter()
    num_chunks = num_chunks or cfg["workflow"]["num_chunks"]
    root = Path(root) if root is not None else data_root(cfg)
    split = split_name(cfg)
    out = chunk_dir(root, chunk)
    shard = load_shard(cfg, chunk, num_chunks)
    if shard.total == 0:
        raise ConfigError(f"dataset: split {cfg['dataset']['split']!r} of {cfg['dataset']['path']!r} has no rows")
    tokenizer = load_tokenizer(cfg)
    tokenizer.padding_side = cfg["tokenizer"]["padding"]
    tok = tokenize_shard(shard, tokenizer, cfg["tokenizer"]["max_length"])
    ident = {"chunk": chunk, "num_chunks": num_chunks, "config_fingerprint": chunk_fingerprint(cfg),
             "example_range": [shard.start, shard.stop], "examples": len(tok.ids)}
    progress = ChunkProgress.open(out, ident, len(tok.ids), split)
    if progress.resumed:
        log.info("chunk %d: resuming after %d of %d examples (%d finished segments)", chunk,
                 progress.resumed["examples"], len(tok.ids), progress.resumed["segments"])
    device = pick_device(cfg)
    model = load_model(cfg, device)
    spec = resolve_capture(cfg, model.config)
    n_q, n_kv, head_dim = head_counts(model.config)
    n_layers = text_config(model.config).num_hidden_layers
    t_loaded = time.perf_counter()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ac = cfg["inference"]["autocast_dtype"]
    capturer = Capturer(model, spec, pad_id=pad_id, padding_side=cfg["tokenizer"]["padding"],
                        autocast_dtype=DTYPES[ac] if ac else None)
    token_table = None
    if cfg["capture"]["capture_token_strings"]:
        token_table = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    n_configs = len(spec.layers) * (len(spec.query_heads) * ("q" in spec.kinds) + len(spec.key_heads) * ("k" in spec.kinds))

    def new_segment() -> Segment:
        path = progress.segment_path()
        return Segment(path, ChunkWriter(
            path, split, head_dim=head_dim, n_layers=n_layers, n_heads=n_q, vector_dtype=cfg["capture"]["vector_dtype"],
            token_strings=token_table is not None, token_table=token_table,
            buffer_bytes=cfg["inference"]["writer_buffer_mb"] << 20, n_configs_hint=n_configs))

    lengths = np.array([len(s) for s in tok.ids], dtype=np.int64)
    tokens = int(lengths.sum())
    pending = progress.pending()
    # the pending examples are the tail of the full length-sorted order (the sort is stable), so a
    # resumed chunk runs exactly the batches an uninterrupted one would have run next
    batches = [pending[b] for b in length_sorted_batches(lengths[pending], cfg["inference"]["batch_size"])]
    every = cfg["inference"]["checkpoint_every_s"]
    done = 0
    bar = _progress(len(tok.ids))
    bar.update(len(tok.ids) - len(pending))
    if batches:
        # The first forward of a process is computed twice and its result dropped: on CPU an occasional
        # process got the first call of the rotary embedding's cos wrong in half of the batch's rows (~2e-4,
        # from torch's kernels; an immediate second call is exact), so without this two processes running
        # the same chunk could differ in that batch's vectors.
        first = batches[0]
        capturer.run_batch([tok.ids[j] for j in first], tok.example_ids[first]).wait()
    seg = new_segment()
    t_seg = time.perf_counter()
    try:
        for i, idx in enumerate(batches):
            seqs = [tok.ids[j] for j in idx]
            batch = capturer.run_batch(seqs, tok.example_ids[idx])
            seg.writer.put(batch)
            n_tok = int(lengths[idx].sum())
            seg.add(idx, n_tok, len(idx) * int(lengths[idx].max()))
            done += n_tok
            bar.update(len(idx))
            bar.set_postfix(tok_s=int(done / max(time.perf_counter() - t_loaded, 1e-9)), refresh=False)
            if every and i + 1 < len(batches) and time.perf_counter() - t_seg >= every:
                progress.commit(seg, time.perf_counter() - t_seg)
                seg, t_seg = new_segment(), time.perf_counter()
        if not seg.empty or not progress.segments:
            progress.commit(seg, time.perf_counter() - t_seg)
        else:
            seg.writer.abort()
        t_forward = time.perf_counter()
        rows, summaries = progress.assemble()
    except BaseException:
        seg.writer.abort()
        raise
    finally:
        bar.close()
        capturer.close()
    t_done = time.perf_counter()
    forward_s = t_forward - t_loaded
    if shard.stop == shard.start:
        log.warning("chunk %d of %d is empty (the split has %d rows); recorded with no rows", chunk, num_chunks, shard.total)
    names = {config_name(layer, h, k, n_layers, n_q) for layer in spec.layers for k in spec.kinds for h in spec.heads_for(k)}
    manifest = {
        "chunk": chunk,
        "num_chunks": num_chunks,
        "split": split,
        "example_range": [shard.start, shard.stop],
        "examples": len(tok.ids),
        "skipped_empty": tok.skipped_empty,
        "skipped_invalid": tok.skipped_invalid,
        "tokens": tokens,
        "computed_tokens": progress.totals()["computed_tokens"],
        "rows": {name: int(rows.get(name, 0)) for name in sorted(names)},
        "files": {name: f"data/{split}/{name}/data.parquet" for name in sorted(rows) if rows[name] > 0},
        # per file: keys, bucket counts and identity, so the merge appends it without reading it again
        "summaries": {name: summaries[name] for name in sorted(summaries)},
        "config_fingerprint": chunk_fingerprint(cfg),
        "sampling": sampling_settings(cfg),
        "model": {
            "name": cfg["model"]["name"],
            "revision": cfg["model"].get("revision") or getattr(model.config, "_commit_hash", None),
            "dtype": cfg["model"]["dtype"],
            "attn_implementation": cfg["model"]["attn_implementation"],
            "num_layers": n_layers, "num_heads": n_q, "num_kv_heads": n_kv, "head_dim": head_dim,
            "layer_windows": [spec.layer_windows[i] for i in range(n_layers)],
        },
        "dataset": {k: cfg["dataset"][k] for k in ("path", "name", "split", "text_column", "id_column", "max_samples")},
        "device": str(capturer.input_device),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "versions": _versions(),
        "timings": {
            "load_s": round(t_loaded - t0, 3),
            "forward_s": round(forward_s, 3),
            "assemble_s": round(t_done - t_forward, 3),  # sorting and writing the chunk's files
            "total_s": round(t_done - t0, 3),
            "tokens_per_s": round(done / forward_s, 1) if forward_s > 0 else None,
        },
        "segments": len(progress.segments),
        "resumed": progress.resumed,
    }
    atomic_write_json(manifest_path(root, chunk), manifest)
    progress.cleanup()
    return manifest

