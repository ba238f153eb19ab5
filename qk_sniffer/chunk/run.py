"""``sniff-chunk``: run the model over one dataset shard and stage its captures."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..capture import CapturedBatch, Sniffer, StopForward, to_device
from ..config import ConfigError, chunk_fingerprint, data_root, fingerprint_inputs, sampling_settings, split_name
from ..layout import atomic_write_json, chunk_dir, config_name, manifest_path
from ..modeling import DTYPES, backbone_of, load_model, load_tokenizer, pick_device, resolve_capture
from ..records import ChunkManifest
from .checkpoints import ChunkProgress, Segment
from .plan import ChunkSpec, plan_chunk
from .source import length_sorted_batches, load_shard, tokenize_shard
from .writer import ChunkWriter

log = logging.getLogger("qk_sniffer")


class Capturer:
    """Runs batches through the backbone with a sniffer attached; no LM head, early exit.

    Every batch is padded on the right and runs without a padding mask: each row's positions are
    0..L-1 and causal attention never lets a real token see the padding after it, so a real token's
    vectors are those of its example run alone, and no [B, 1, L, L] mask is ever built (sliding
    windows, chunks and every other mask feature are built by the model from the positions as usual).
    The probe proves the model causal first (appending tokens changes no earlier q/k); a model that
    is not (a BERT-style decoder without ``is_decoder``) gets the padding mask.
    ``padding_side`` is accepted for compatibility and never changes where padding goes.
    """

    def __init__(self, model, spec, *, pad_id: int = 0, padding_side: str = "right", autocast_dtype=None):
        self.model = model
        self.backbone = backbone_of(model)
        self.input_device = self.backbone.get_input_embeddings().weight.device
        self.sniffer = Sniffer(spec, device=self.input_device)
        self.sniffer.attach(spec.geometry.modules if spec.geometry is not None else {})
        self.causal = spec.geometry.causal if spec.geometry is not None else True
        self.pad_id = pad_id
        self.padding_side = "right"
        self.autocast_dtype = autocast_dtype
        self.timing: dict | None = None  # inference.debug_logging: seconds spent per step of the last batch

    def enable_timing(self) -> None:
        """Time every batch's selection, forward and capture hooks (host time in the hooks; the forward is
        synchronised with the GPU, one sync per batch)."""
        self.timing = {"hooks_s": 0.0}
        for name in ("on_attention", "capture"):
            setattr(self.sniffer, name, self._timed(getattr(self.sniffer, name)))

    def _timed(self, inner):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.timing["hooks_s"] += time.perf_counter() - t
        return timed

    def close(self) -> None:
        self.sniffer.remove_hooks()
        self.sniffer.deactivate()

    def run_batch(self, seqs: list, example_ids) -> CapturedBatch:
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        width = int(lengths.max())
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        offsets = np.zeros_like(lengths)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        pos = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape)
        dev = self.input_device
        t0 = time.perf_counter()
        if self.timing is not None:
            self.timing["hooks_s"] = 0.0
        self.sniffer.begin_batch(example_ids, lengths, offsets, token_ids=ids)
        t1 = time.perf_counter()
        width_shape = ids.shape
        t_ids, t_pos = (t.view(width_shape) for t in to_device([ids.ravel(), pos.ravel()], dev))
        extra = {}
        if not self.causal and int(lengths.min()) < width:
            # a model that is not causal (the probe's proof failed) gets the padding mask: real tokens
            # must not see the padding after them
            mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            extra["attention_mask"] = torch.from_numpy(mask).to(dev)
        ac = (torch.autocast(device_type=dev.type, dtype=self.autocast_dtype)
              if self.autocast_dtype is not None else nullcontext())
        with self.sniffer, torch.inference_mode(), ac:
            try:
                self.backbone(input_ids=t_ids, position_ids=t_pos, use_cache=False, **extra)
            except StopForward:
                pass
        if self.timing is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.timing.update(select_s=t1 - t0, forward_s=time.perf_counter() - t1)
        batch = self.sniffer.end_batch()
        if batch.missing_layers:
            raise RuntimeError(
                f"layers {batch.missing_layers} reached the capture code in the probe forward but not in this batch: "
                f"{type(self.model).__name__} takes another path for these inputs; capture those layers separately"
            )
        return batch


def _log_batch(i: int, n: int, idx, lengths, batch: CapturedBatch, timing: dict, flush_s: float) -> None:
    """One line of inference.debug_logging: the batch's size and where its time went."""
    rows = sum(p.size if p.per_head else p.size * len(p.heads) for _, _, p, _, _ in batch.items)
    ms = {k: 1000 * v for k, v in timing.items()}
    log.info("batch %d/%d: %d examples, %d tokens (width %d), %d rows; select %.1f ms, forward %.1f ms (capture hooks "
             "%.1f ms), flush %.1f ms", i + 1, n, len(idx), int(lengths[idx].sum()), int(lengths[idx].max()), rows,
             ms["select_s"], ms["forward_s"], ms["hooks_s"], 1000 * flush_s)


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


def run_chunk(cfg: dict, chunk: int, plan: ChunkSpec | None = None, root: Path | None = None,
              token_cache: Path | None = None) -> dict:
    """Capture chunk ``chunk`` into ``staging/chunk-<chunk>/``; write its manifest last.

    ``plan``: the chunk's examples and fingerprint as the workflow planned them (its plan file); without it the
    plan is made here from the data root's records (:func:`qk_sniffer.chunk.plan.plan_chunk`).
    ``token_cache``: a folder shared with other sweep members reading the same examples (qk_sniffer.chunk.tokens).
    """
    t0 = time.perf_counter()
    root = Path(root) if root is not None else data_root(cfg)
    from ..legacy import refuse_local

    refuse_local(root)  # a data root holding the original tool's dataset: refused before any work (sniff-qk migrate)
    split = split_name(cfg)
    out = chunk_dir(root, chunk)
    if plan is None:
        plan = plan_chunk(cfg, chunk, root)
    elif plan.chunk != chunk or plan.fingerprint != chunk_fingerprint(cfg):
        raise ConfigError(
            f"chunk {chunk}: its plan (chunk {plan.chunk}, fingerprint {plan.fingerprint}) does not match the config "
            f"(fingerprint {chunk_fingerprint(cfg)}): the config changed while the workflow ran (or two runs with "
            "different configs share one data root); rerun snakemake")
    shard = load_shard(cfg, chunk, plan.start, plan.stop)
    if shard.total == 0:
        raise ConfigError(f"dataset: split {cfg['dataset']['split']!r} of {cfg['dataset']['path']!r} has no rows")
    tokenizer = load_tokenizer(cfg)
    if cfg["tokenizer"]["padding_side"] == "left":
        log.warning("tokenizer.padding_side: left is not used: qk-sniffer pads on the right without a padding mask, where "
                    "padding never changes a vector (left padding shifts positions in some models' attention)")
    if token_cache is not None:
        from .tokens import tokenize_shared

        tok = tokenize_shared(Path(token_cache), shard, tokenizer, cfg["tokenizer"]["max_length"])
    else:
        tok = tokenize_shard(shard, tokenizer, cfg["tokenizer"]["max_length"])
    ident = {"chunk": chunk, "config_fingerprint": chunk_fingerprint(cfg),
             "example_range": [shard.start, shard.stop], "examples": len(tok.ids)}
    progress = ChunkProgress.open(out, ident, len(tok.ids), split)
    if progress.resumed:
        log.info("chunk %d: resuming after %d of %d examples (%d finished segments)", chunk,
                 progress.resumed["examples"], len(tok.ids), progress.resumed["segments"])
    device = pick_device(cfg)
    model = load_model(cfg, device)
    spec = resolve_capture(cfg, model)
    n_q, n_kv, head_dim, n_layers = spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.n_layers
    t_loaded = time.perf_counter()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ac = cfg["inference"]["autocast_dtype"]
    capturer = Capturer(model, spec, pad_id=pad_id, padding_side=cfg["tokenizer"]["padding_side"],
                        autocast_dtype=DTYPES[ac] if ac else None)  # float32 was validated into null: no autocast
    debug_every = cfg["inference"]["debug_log_every_n_batches"] if cfg["inference"]["debug_logging"] else 0
    if debug_every:
        capturer.enable_timing()
    token_table = None
    if cfg["capture"]["capture_token_strings"]:
        token_table = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    n_configs = sum(len(spec.heads_for(k, layer)) for layer in spec.layers for k in spec.kinds)

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
    if batches and capturer.input_device.type == "cpu":
        # On the CPU only, the first forward of a process is computed twice and its result dropped: an
        # occasional process got the first call of the rotary embedding's cos wrong in half of the batch's
        # rows (~2e-4, from torch's CPU kernels; an immediate second call is exact), so without this two
        # processes running the same chunk could differ in that batch's vectors. GPUs never showed it.
        first = batches[0]
        capturer.run_batch([tok.ids[j] for j in first], tok.example_ids[first]).wait()
    seg = new_segment()
    t_seg = time.perf_counter()
    try:
        for i, idx in enumerate(batches):
            seqs = [tok.ids[j] for j in idx]
            batch = capturer.run_batch(seqs, tok.example_ids[idx])
            t_flush = time.perf_counter()
            if debug_every:
                batch.wait()  # the device-to-host copy counts as flush time
            seg.writer.put(batch)  # waits while the writer is behind
            if debug_every and (i + 1) % debug_every == 0:
                _log_batch(i, len(batches), idx, lengths, batch, capturer.timing, time.perf_counter() - t_flush)
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
        rows = progress.assemble()
    except BaseException:
        seg.writer.abort()
        raise
    finally:
        bar.close()
        capturer.close()
    t_done = time.perf_counter()
    forward_s = t_forward - t_loaded
    if shard.stop == shard.start:
        log.warning("chunk %d is empty (the split has %s rows); recorded with no rows", chunk, shard.total)
    names = {config_name(layer, h, k, n_layers, n_q) for layer in spec.layers for k in spec.kinds
             for h in spec.heads_for(k, layer)}
    manifest = ChunkManifest(
        chunk=chunk,
        split=split,
        example_range=[shard.start, shard.stop],
        chunk_size=plan.chunk_size,
        examples=len(tok.ids),
        skipped_empty=tok.skipped_empty,
        skipped_invalid=tok.skipped_invalid,
        tokens=tokens,
        computed_tokens=progress.totals()["computed_tokens"],
        rows={name: int(rows.get(name, 0)) for name in sorted(names)},
        files={name: f"data/{split}/{name}/data.parquet" for name in sorted(rows) if rows[name] > 0},
        config_fingerprint=chunk_fingerprint(cfg),
        # what the fingerprint hashes, so a later run can say which setting changed
        fingerprint_inputs=json.loads(json.dumps(fingerprint_inputs(cfg), default=str)),
        sampling=sampling_settings(cfg),
        model={
            "name": cfg["model"]["name"],
            "revision": cfg["model"].get("revision") or getattr(model.config, "_commit_hash", None),
            "dtype": cfg["model"]["dtype"],
            "attn_implementation": getattr(model, "qk_sniffer_attention", cfg["model"]["attn_implementation"]),
            "num_layers": n_layers, "num_heads": n_q, "num_kv_heads": n_kv, "head_dim": head_dim,
            "layer_windows": [spec.layer_windows[i] for i in range(n_layers)],
            # full / sliding:W / chunked:C per layer, which layers ran a rotary function, and the layers left out
            "layer_attention": [spec.layer_attention[i] for i in range(n_layers)],
            "rope_layers": sorted(i for i, g in spec.geometry.layers.items() if g.rope),
            "rope_unknown_layers": sorted(i for i, g in spec.geometry.layers.items() if g.rope is None),
            # layers where attention receives something else than the rotation's output (a norm or scaling after it)
            "post_rotation_transform": {kind: sorted(i for i, g in spec.geometry.layers.items()
                                                     if kind in g.recipes and g.recipes[kind].post_transform)
                                        for kind in ("q", "k")},
            "skipped_layers": {str(i): why for i, why in sorted(spec.skipped_layers.items())},
            # capture.head_sampling: seed, requested and selected counts, and the heads (None: every selected head)
            "head_sampling": spec.head_sampling,
        },
        dataset={k: cfg["dataset"][k] for k in ("path", "name", "split", "text_column", "id_column", "max_samples")},
        device=str(capturer.input_device),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        versions=_versions(),
        timings={
            "load_s": round(t_loaded - t0, 3),
            "forward_s": round(forward_s, 3),
            "assemble_s": round(t_done - t_forward, 3),  # sorting and writing the chunk's files
            "total_s": round(t_done - t0, 3),
            "tokens_per_s": round(done / forward_s, 1) if forward_s > 0 else None,
        },
        segments=len(progress.segments),
        resumed=progress.resumed,
    )
    written = manifest.to_json()
    atomic_write_json(manifest_path(root, chunk), written)
    progress.cleanup()
    return written

