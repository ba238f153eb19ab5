"""qk-sniffer benchmarks: ratios of medians measured side by side in one process.

    python -m benchmarks                 # every CPU benchmark, appends to benchmarks/RESULTS.md
    python -m benchmarks capture early   # a subset
    python -m benchmarks --device cuda --size 1b --seq 4096,32768 capture early   # on a GPU

Each figure is the ratio of two medians over the same inputs, interleaved repetition by
repetition after a warm-up, so that machine noise cancels. Goals are in GOALS; a missed goal
is printed as such, never hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .extend import bench_extend

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"

GOALS = {
    "capture": "<= 1.05 (CPU), <= 1.03 (GPU)",
    "early": "<= 1/L + 0.10",
    "merge": ">= 50x faster than row-by-row, <= 2x raw pyarrow read+write",
    "memory": "flat within 15%",
    "padding": "<= 1.15 sorted",
    "resume": "<= 2/6",
    "plan": "report; per-head below a 1B-model forward estimate",
    "checkpoint": "report; cost per checkpoint / default interval (600 s)",
    "longctx": "time (b) <= 1.15 x ((a) L + (a) 3L/4); memory (b) well under (c)",
    "extend": "<= 0.6 (about the new half)",
}
EXTRA: list[str] = []  # markdown blocks a benchmark adds below the table (per-case detail)

# model shapes (Llama architecture, random weights)
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
}


def median_times(fns: list, reps: int, warmup: int = 1) -> list[float]:
    """Median seconds of each of ``fns``, run interleaved, each taking its turn at going first."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for rep in range(reps):
        k = rep % len(fns)
        for i in [*range(k, len(fns)), *range(k)]:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def median_ratio(fa, fb, reps: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median a, median b, median a / median b) with a and b interleaved."""
    ma, mb = median_times([fa, fb], reps, warmup)
    return ma, mb, ma / mb


def build_model(size: str, out: Path) -> Path:
    from qk_sniffer.tiny_checkpoints import build_model as build

    if not (out / "config.json").exists():
        big = size != "tiny"
        build("llama", out, seed=0, max_position_embeddings=65536, init_std=0.02 if big else 0.2,
              dtype="bfloat16" if big else "float32", **SIZES[size])
    return out


def _cfg(model_dir: Path, root: Path, **capture):
    from qk_sniffer.config import validate_config

    return validate_config({
        "dataset": {"path": "json", "data_files": str(REPO / "config/demo/corpus.jsonl")},
        "model": {"name": str(model_dir), "dtype": "float32"},
        "capture": {"min_bucket_size": 128, **capture},
        "output": {"data_root": str(root), "split_name": "bench"},
    })


STREAM = 4  # batches per timed call of Forward: steady state, not one isolated batch


class _PlainStop(Exception):
    pass


class Forward:
    """The backbone forward with and without capture over the same batches."""

    def __init__(self, model_dir: Path, root: Path, device: str, dtype: str, batch: int, seq: int, layers=None):
        import torch
        from transformers import AutoModelForCausalLM

        from qk_sniffer.chunk.run import Capturer
        from qk_sniffer.chunk.writer import ChunkWriter
        from qk_sniffer.modeling import DTYPES, attention_modules, backbone_of, load_model, resolve_capture

        self.torch = torch
        self.device = torch.device(device)
        cfg = _cfg(model_dir, root, layers=layers)
        cfg["model"]["dtype"] = dtype
        self.model = load_model(cfg, self.device)
        spec = resolve_capture(cfg, self.model)
        self.capturer = Capturer(self.model, spec, pad_id=0)
        n_q = self.model.config.num_attention_heads
        self.writer = ChunkWriter(root / "staging" / "chunk-0", "bench", head_dim=spec.head_dim,
                                  n_layers=self.model.config.num_hidden_layers, n_heads=n_q)
        self.plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                          dtype=DTYPES[dtype]).to(self.device).eval()
        self.plain_backbone = backbone_of(self.plain)
        # the capture run stops after the last captured layer's attention (README.md, "How capture works"); the
        # same-depth baseline stops the plain model there too, so the ratio is the capture's own cost
        self._stop_plain = False
        last = attention_modules(self.plain_backbone)[max(spec.layers)]
        last.register_forward_hook(self._maybe_stop)
        rng = np.random.default_rng(0)
        vocab = self.model.config.vocab_size
        self.seqs = [rng.integers(5, vocab, size=seq) for _ in range(batch)]
        self.ids = torch.as_tensor(np.stack(self.seqs), device=self.device)
        self.mask = torch.ones_like(self.ids)
        self.pos = torch.arange(seq, device=self.device).expand(batch, -1)
        self.next_id = 0

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _maybe_stop(self, module, args, output):
        if self._stop_plain:
            raise _PlainStop()

    def baseline(self):
        """The whole backbone, no capture, ``STREAM`` batches back to back."""
        with self.torch.inference_mode():
            for _ in range(STREAM):
                try:
                    self.plain_backbone(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                                        use_cache=False)
                except _PlainStop:
                    pass
        self.sync()

    def same_depth(self):
        """The backbone up to where the capture run stops (the last captured layer's attention), no capture."""
        self._stop_plain = True
        try:
            self.baseline()
        finally:
            self._stop_plain = False

    def captured(self):
        """``STREAM`` batches back to back as sniff-chunk runs them (the host plans batch n+1 while the
        device still runs batch n), then wait for the last one's vectors."""
        for _ in range(STREAM):
            ids = np.arange(self.next_id, self.next_id + len(self.seqs))
            self.next_id += len(self.seqs)
            batch = self.capturer.run_batch(self.seqs, ids)
            self.writer.put(batch)
        batch.wait()
        self.sync()

    def close(self):
        self.writer.close()
        self.capturer.close()


def bench_capture(args, tmp: Path) -> list[dict]:
    rows = []
    model_dir = build_model(args.size, tmp / f"model-{args.size}")
    for seq in args.seq:
        batch = max(1, args.tokens // seq)
        fw = Forward(model_dir, tmp / f"cap-{seq}", args.device, args.dtype, batch, seq)
        ma, mb, mfull = median_times([fw.captured, fw.same_depth, fw.baseline], args.reps)
        fw.close()
        case = f"{args.size} {args.device} {args.dtype} {batch}x{seq}"
        ma, mb, mfull = ma / STREAM, mb / STREAM, mfull / STREAM  # per batch
        rows.append(dict(benchmark="capture", case=case, a=f"with capture {ma * 1e3:.1f} ms",
                         b=f"plain forward to the same depth {mb * 1e3:.1f} ms", ratio=round(ma / mb, 3),
                         goal=GOALS["capture"]))
        rows.append(dict(benchmark="capture", case=case + " (vs the whole backbone)", a=f"with capture {ma * 1e3:.1f} ms",
                         b=f"whole plain backbone {mfull * 1e3:.1f} ms", ratio=round(ma / mfull, 3),
                         goal="report (capture also skips the last layer's MLP and norm)"))
    return rows


def bench_early(args, tmp: Path) -> list[dict]:
    rows = []
    model_dir = build_model(args.size, tmp / f"model-{args.size}")
    for seq in args.seq:
        batch = max(1, args.tokens // seq)
        first = Forward(model_dir, tmp / f"early0-{seq}", args.device, args.dtype, batch, seq, layers=[0])
        every = Forward(model_dir, tmp / f"earlyall-{seq}", args.device, args.dtype, batch, seq)
        ma, mb, r = median_ratio(first.captured, every.captured, args.reps)
        first.close()
        every.close()
        n_layers = SIZES[args.size]["num_hidden_layers"]
        rows.append(dict(benchmark="early", case=f"{args.size} {args.device} L={n_layers} {batch}x{seq}",
                         a=f"layer 0 only {ma / STREAM * 1e3:.1f} ms", b=f"all layers {mb / STREAM * 1e3:.1f} ms",
                         ratio=round(r, 3),
                         goal=f"<= {1 / n_layers + 0.10:.3f}"))
    return rows


def bench_padding(args, tmp: Path) -> list[dict]:
    from qk_sniffer.chunk.source import length_sorted_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 1025, size=4000)
    real = lengths.sum()

    def computed(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    sorted_b = length_sorted_batches(lengths, 8)
    order_b = [np.arange(i, min(i + 8, len(lengths))) for i in range(0, len(lengths), 8)]
    return [dict(benchmark="padding", case="4000 examples, lengths 16..1024, batch 8",
                 a=f"sorted {computed(sorted_b) / real:.3f}", b=f"dataset order {computed(order_b) / real:.3f}",
                 ratio=round(computed(sorted_b) / real, 3), goal=GOALS["padding"])]


def bench_plan(args, tmp: Path) -> list[dict]:
    from qk_sniffer.sampling import SHARED_HEAD, BatchTokens, SamplerSpec

    shape = SIZES["1b"]
    n_layers, n_q, n_kv = shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"]
    seq = 131072
    rows = []
    times = {}
    for per_head in (False, True):
        spec = SamplerSpec(type="log_uniform", base_rate=1.0, seed=0, per_head=per_head, min_bucket_size=128)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            tokens = BatchTokens(np.array([1]), np.array([seq]), np.array([0]), spec)
            for layer in range(n_layers):
                for kind, heads in ((0, n_q), (1, n_kv)):
                    for h in (range(heads) if per_head else [SHARED_HEAD]):
                        tokens.select(layer, h, kind)
            runs.append(time.perf_counter() - t)
        times[per_head] = statistics.median(runs)
    # 1B-model forward estimate at 128k tokens on one H100-class GPU (~400 TFLOP/s sustained bf16)
    params = 1.2e9
    flops = 2 * params * seq + 2 * n_layers * seq * seq * shape["hidden_size"]  # dense + causal attention
    est = flops / 400e12
    rows.append(dict(benchmark="plan", case=f"128k tokens, {n_layers} layers, {n_q}q/{n_kv}kv heads",
                     a=f"shared {times[False] * 1e3:.0f} ms", b=f"per-head {times[True] * 1e3:.0f} ms",
                     ratio=round(times[True] / est, 3),
                     goal=f"per-head / 1B forward estimate ({est:.2f} s) < 1"))
    return rows


_MEM_CHILD = """
import json, resource, sys
from qk_sniffer.config import validate_config
from qk_sniffer.chunk.run import run_chunk
cfg = validate_config(json.loads(sys.argv[1]))
run_chunk(cfg, 0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory(args, tmp: Path) -> list[dict]:
    texts = [json.loads(line)["text"] for line in (REPO / "config/demo/corpus.jsonl").read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    corpus = tmp / "mem-corpus.jsonl"
    with open(corpus, "w") as fh:
        for i in range(2000):
            fh.write(json.dumps({"text": texts[i % len(texts)] + f" (copy {i})"}) + "\n")
    rss = {}
    for n in (200, 2000):
        cfg = {
            "dataset": {"path": "json", "data_files": str(corpus), "max_samples": n},
            "model": {"name": str(REPO / "models/tiny/llama")},
            "tokenizer": {"max_length": 512},
            "inference": {"batch_size": 16, "writer_buffer_mb": 16},
            "capture": {"min_bucket_size": 16, "sampler": {"base_rate": 4.0}},
            "output": {"data_root": str(tmp / f"mem-{n}"), "split_name": "bench"},
        }
        out = subprocess.run([sys.executable, "-c", _MEM_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                             check=True, cwd=REPO)
        rss[n] = int(out.stdout.strip().splitlines()[-1]) / 1024
    return [dict(benchmark="memory", case="sniff-chunk, tiny Llama, 200 vs 2000 examples",
                 a=f"2000 ex {rss[2000]:.0f} MiB", b=f"200 ex {rss[200]:.0f} MiB", ratio=round(rss[2000] / rss[200], 3),
                 goal=GOALS["memory"])]


def bench_checkpoint(args, tmp: Path) -> list[dict]:
    """What one checkpoint inside a chunk costs: the same chunk with a checkpoint after every batch vs none.

    The difference of the two forward times (which include the final assembly of the segments)
    divided by the number of checkpoints; the overhead at the default interval is that over 600 s.
    """
    import polars as pl

    from qk_sniffer.chunk.run import run_chunk
    from qk_sniffer.config import validate_config

    model_dir = build_model(args.size, tmp / f"model-{args.size}")
    seq = args.seq[0]
    batch = max(1, args.tokens // seq)
    n_batches = 8
    texts = [json.loads(line)["text"] for line in (REPO / "config/demo/corpus.jsonl").read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    corpus = tmp / "ckpt-corpus.jsonl"
    with open(corpus, "w") as fh:  # every example long enough to fill max_length
        for i in range(batch * n_batches):
            fh.write(json.dumps({"text": " ".join(texts[(i + j) % len(texts)] for j in range(seq // 8))}) + "\n")

    def cfg(every: float) -> dict:
        return validate_config({
            "dataset": {"path": "json", "data_files": str(corpus)},
            "model": {"name": str(model_dir), "dtype": args.dtype},
            "tokenizer": {"max_length": seq},
            "inference": {"batch_size": batch, "device": args.device, "checkpoint_every_s": every},
            "capture": {"min_bucket_size": 128},
            "output": {"data_root": str(tmp / f"ckpt-{every}"), "split_name": "bench"},
        })

    def rows(every: float) -> dict:
        base = tmp / f"ckpt-{every}" / "staging/chunk-0/data/bench"
        return {p.parent.name: pl.read_parquet(p).sort(["example_id", "position"]) for p in base.glob("*/data.parquet")}

    times: dict[float, list[float]] = {0: [], 1e-9: []}
    segments = 1
    reps = max(3, min(args.reps, 5))
    for rep in range(reps + 1):  # the first pair is the warm-up
        for every in ((0, 1e-9) if rep % 2 == 0 else (1e-9, 0)):
            man = run_chunk(cfg(every), 0, 1)
            if rep:
                times[every].append(man["timings"]["forward_s"])
            if every:
                segments = man["segments"]
    a, b = rows(0), rows(1e-9)
    assert a.keys() == b.keys() and all(a[k].select(["example_id", "position"]).equals(
        b[k].select(["example_id", "position"])) for k in a), "checkpointed chunk has other rows"
    t_none, t_every = statistics.median(times[0]), statistics.median(times[1e-9])
    per = (t_every - t_none) / max(1, segments - 1)
    return [dict(benchmark="checkpoint",
                 case=f"{args.size} {args.device} {args.dtype} {batch}x{seq}, {len(a)} configs, {segments - 1} checkpoints",
                 a=f"one per batch {t_every:.2f} s", b=f"none {t_none:.2f} s; {per * 1e3:.0f} ms per checkpoint",
                 ratio=round(per / 600, 5), goal=GOALS["checkpoint"])]


def synth_staging(root: Path, cfg: dict, *, n_chunks: int, n_layers: int, n_heads: int, rows_per_file: int,
                  head_dim: int, seed: int = 0, bf16: bool = False) -> int:
    """Staged chunks shaped like sniff-chunk's output (random vectors; with ``bf16``, rounded to bf16 as a model
    run in bf16 gives them, stored as float32); returns the staged row count."""
    import pyarrow as pa
    import torch

    from qk_sniffer.chunk.writer import row_schema
    from qk_sniffer.config import chunk_fingerprint, sampling_settings, split_name
    from qk_sniffer.layout import atomic_write_json, config_name, data_file, manifest_path
    from qk_sniffer.parquet import write_parquet_atomic
    from qk_sniffer.sampling import bucket_of

    rng = np.random.default_rng(seed)
    split = split_name(cfg)
    schema = row_schema(head_dim)
    total = 0
    for c in range(n_chunks):
        rows, files = {}, {}
        for layer in range(n_layers):
            for head in range(n_heads):
                for kind in "qk":
                    name = config_name(layer, head, kind, n_layers, n_heads)
                    ex = rng.integers(c * 1000, (c + 1) * 1000, size=rows_per_file)
                    pos = rng.integers(0, 4096, size=rows_per_file)
                    key = np.unique(ex * 10000 + pos)
                    ex, pos = key // 10000, key % 10000
                    n = len(key)
                    vec = rng.standard_normal((n, head_dim), dtype=np.float32).reshape(-1)
                    if bf16:
                        vec = torch.from_numpy(vec).bfloat16().float().numpy()
                    table = pa.Table.from_arrays([
                        pa.array(bucket_of(pos, "log_uniform", 128).astype(np.int32)), pa.array(ex),
                        pa.array(pos.astype(np.int32)), pa.FixedSizeListArray.from_arrays(pa.array(vec), head_dim),
                        pa.nulls(n, pa.int32()), pa.repeat(pa.scalar(layer, pa.int16()), n),
                        pa.repeat(pa.scalar(head, pa.int16()), n), pa.repeat(pa.scalar(kind), n)], schema=schema)
                    # as sniff-chunk writes them: sorted by key, in the final files' format
                    path = data_file(root / "staging" / f"chunk-{c}", split, name)
                    write_parquet_atomic(table, path)
                    rows[name] = n
                    files[name] = f"data/{split}/{name}/data.parquet"
                    total += n
        atomic_write_json(manifest_path(root, c), {
            "chunk": c, "num_chunks": n_chunks, "split": split, "example_range": [c * 1000, (c + 1) * 1000],
            "examples": 1000, "tokens": 0, "rows": rows, "files": files,
            "config_fingerprint": chunk_fingerprint(cfg), "sampling": sampling_settings(cfg),
            "model": {"name": "synthetic", "num_layers": n_layers, "num_heads": n_heads, "num_kv_heads": n_heads,
                      "head_dim": head_dim, "layer_windows": [None] * n_layers},
        })
    return total


def bench_merge(args, tmp: Path) -> list[dict]:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from qk_sniffer.merge import merge_staging

    head_dim = 128
    src = tmp / "merge-src"
    cfg = _cfg(REPO / "models/tiny/llama", src)
    cfg["workflow"]["num_chunks"] = 8
    shape = dict(n_chunks=8, n_layers=8, n_heads=4, rows_per_file=2100, head_dim=head_dim)
    staged = synth_staging(src, cfg, **shape)
    src_bf16 = tmp / "merge-src-bf16"
    assert synth_staging(src_bf16, cfg, **shape, bf16=True) == staged
    configs = sorted({p.parent.name for p in src.glob("staging/chunk-*/data/*/*/data.parquet")})
    subset = configs[:4]

    def staged_files(work: Path, name: str) -> list[Path]:
        return sorted(work.glob(f"staging/chunk-*/data/*/{name}/data.parquet"))

    def ours(work: Path) -> None:
        assert merge_staging(cfg, work)["methods"]["rewrite"] == 0

    def rewrite(work: Path) -> None:  # the way taken when keys interleave with the final rows or repeat
        merge_staging(cfg, work, append=False)

    def chunk_side(work: Path) -> None:  # what the chunks pay for it: sort and write each staged file
        from qk_sniffer.parquet import KEYS, write_parquet_atomic

        for p in sorted(work.glob("staging/chunk-*/data/*/*/data.parquet")):
            write_parquet_atomic(pq.read_table(p).sort_by([(k, "ascending") for k in KEYS]), p)

    def raw(work: Path) -> None:  # the floor: read every staged file of a config, write one file, nothing else
        for name in configs:
            t = pa.concat_tables([pq.read_table(p) for p in staged_files(work, name)])
            out = work / "raw" / f"{name}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t, out, compression="zstd")

    def copy_floor(work: Path, durable: bool = False) -> None:  # the bytes, copied once into one file per config
        for name in configs:
            out = work / "copy" / f"{name}.bin"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as fh:
                for p in staged_files(work, name):
                    with open(p, "rb") as src:
                        shutil.copyfileobj(src, fh, 16 << 20)
                if durable:  # on disk before it could be renamed into place, as the merge does
                    fh.flush()
                    os.fsync(fh.fileno())

    def durable_floor(work: Path) -> None:
        copy_floor(work, durable=True)

    def not_durable(work: Path) -> None:  # what the merge would take if it did not wait for the disk (it does)
        from unittest import mock

        with mock.patch("os.fsync"):
            ours(work)

    def row_by_row(work: Path) -> None:  # the naive design: Python objects per row, dict dedup, sort, write
        for name in subset:
            seen = {}
            for p in staged_files(work, name):
                for row in pq.read_table(p).to_pylist():
                    seen.setdefault((row["example_id"], row["position"]), row)
            out = work / "naive" / f"{name}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist([seen[k] for k in sorted(seen)]), out, compression="zstd")

    def timed(fn, source: Path = src) -> float:
        work = tmp / "merge-work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source / "staging", work / "staging")  # not timed
        os.sync()  # the copy's dirty pages written out now, not during (and charged to) the timed call
        t = time.perf_counter()
        took = fn(work)
        return took if took is not None else time.perf_counter() - t

    def medians(source: Path, interleaved: dict, apart: dict) -> dict[str, float]:
        """Median times of ``interleaved`` (run in turn, ``reps`` rounds) and of ``apart`` (3 runs each, slow)."""
        times: dict[str, list[float]] = {name: [] for name in interleaved}
        for _ in range(reps):
            for name, fn in interleaved.items():
                times[name].append(timed(fn, source))
        times.update({name: [timed(fn, source) for _ in range(3)] for name, fn in apart.items()})
        return {name: statistics.median(t) for name, t in times.items()}

    reps = max(3, min(args.reps, 5))
    timed(ours), timed(raw)  # warm-up
    m = medians(src, {"ours": ours, "raw": raw, "rewrite": rewrite, "copy": copy_floor, "durable": durable_floor,
                      "nosync": not_durable},
                {"chunk": chunk_side, "naive": row_by_row})
    # the same, on a bf16 model's vectors
    m16 = medians(src_bf16, {"ours": ours, "raw": raw, "durable": durable_floor}, {"naive": row_by_row})
    naive = m["naive"] / len(subset) * len(configs)  # row-by-row, scaled to every config
    naive16 = m16["naive"] / len(subset) * len(configs)
    size, size16 = (sum(f.stat().st_size for f in d.glob("staging/chunk-*/data/*/*/data.parquet")) / 2**20
                    for d in (src, src_bf16))
    case = f"{staged:,} staged rows ({size:,.0f} MiB), {len(configs)} configs, 8 chunks, D={head_dim}"

    def row(case: str, a: str, b: str, ratio: float, goal: str) -> dict:
        return dict(benchmark="merge", case=case, a=a, b=b, ratio=ratio, goal=goal)

    vs_naive = f"row-by-row {naive:.1f} s"
    return [
        row(f"{case}; new examples (appended byte for byte)",
            f"merge_staging {m['ours']:.2f} s ({staged / m['ours']:,.0f} rows/s)",
            f"raw pyarrow read+write {m['raw']:.2f} s", round(m["ours"] / m["raw"], 3), "<= 2x raw"),
        row(f"same; row-by-row timed on {len(subset)} configs, scaled to {len(configs)}",
            f"merge_staging {m['ours']:.2f} s", vs_naive, round(naive / m["ours"], 1), ">= 50x faster"),
        row("same; the floor: copying the staged bytes once into one file per config", f"copy {m['copy']:.2f} s",
            vs_naive, round(naive / m["copy"], 1), "report (the most any merge can gain over row-by-row here)"),
        row("same; the durable floor: that copy, each file fsynced (as any safe merge must)",
            f"copy + fsync {m['durable']:.2f} s", f"merge_staging {m['ours']:.2f} s",
            round(m["ours"] / m["durable"], 3), "report (merge / durable floor)"),
        row("same, with fsync disabled (not how it runs: what durability costs)",
            f"merge_staging without fsync {m['nosync']:.2f} s", vs_naive, round(naive / m["nosync"], 1), "report"),
        row("same, rewrite path (keys that interleave or repeat: decode, dedup, sort, encode)",
            f"merge_staging append=False {m['rewrite']:.2f} s", f"raw pyarrow read+write {m['raw']:.2f} s",
            round(m["rewrite"] / m["raw"], 3), "<= 2x raw"),
        row("same; what sniff-chunk pays for the append: sorting and writing its files",
            f"sort + write of every staged file {m['chunk']:.2f} s", f"merge_staging rewrite path {m['rewrite']:.2f} s",
            round(m["chunk"] / m["rewrite"], 3), "report (spread over the chunk jobs)"),
        row(f"same rows, vectors of a model run in bf16 (stored as float32: {size16:,.0f} MiB staged)",
            f"merge_staging {m16['ours']:.2f} s", f"row-by-row {naive16:.1f} s", round(naive16 / m16["ours"], 1),
            ">= 50x faster"),
        row("same (bf16 vectors)", f"merge_staging {m16['ours']:.2f} s", f"raw pyarrow read+write {m16['raw']:.2f} s",
            round(m16["ours"] / m16["raw"], 3), "<= 2x raw"),
        row("same (bf16 vectors); the durable floor", f"copy + fsync {m16['durable']:.2f} s",
            f"merge_staging {m16['ours']:.2f} s", round(m16["ours"] / m16["durable"], 3),
            "report (merge / durable floor)"),
    ]


def _snakemake(work: Path, cfg_path: Path, *extra: str, wait: bool = True, **kw):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--configfile", str(cfg_path), "--cores", "2", "--quiet", "all", *extra]
    if wait:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)


def _journal_done(chunk: Path) -> int:
    """Examples the finished segments of a running chunk hold (0 while it has none)."""
    try:
        j = json.loads((chunk / "progress.json").read_text())
        return sum(b - a for seg in j["segments"] for a, b in seg["done"])
    except (OSError, ValueError, KeyError):
        return 0


def bench_resume(args, tmp: Path) -> list[dict]:
    """A 6-chunk run killed half-way through its 5th chunk, then resumed, vs the same run uninterrupted.

    Chunks of 2000 examples carry ~12 s of forward each on this model and checkpoint every 2 s: the
    same proportion as a real chunk of a few hours with the default 10-minute interval. Both runs also
    pay a fixed part the chunks do not shrink (Snakemake's start, then pull, merge, card, verify,
    push and report after the last chunk): with the 5th chunk resumed half-way, the ratio is at most
    1/3 exactly when that fixed part is at most 3/4 of one chunk's forward time (the chunk jobs'
    start-up cancels out). The same run with chunks twice as long shows how the ratio moves with it.
    """
    return [row for per_chunk in (2000, 4000) for row in _resume_case(tmp, per_chunk)]


def _resume_case(tmp: Path, per_chunk: int) -> list[dict]:
    import signal

    import yaml

    corpus = tmp / f"resume-corpus-{per_chunk}.jsonl"
    texts = [json.loads(line)["text"] for line in (REPO / "config/demo/corpus.jsonl").read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    with open(corpus, "w") as fh:
        for i in range(6 * per_chunk):
            fh.write(json.dumps({"text": " ".join(texts[(i + j) % len(texts)] for j in range(3))}) + "\n")

    def config(work: Path) -> Path:
        work.mkdir(parents=True, exist_ok=True)
        cfg = {
            "dataset": {"path": "json", "data_files": str(corpus)},
            "model": {"name": str(REPO / "models/tiny/llama")},
            "tokenizer": {"max_length": 512},
            "inference": {"batch_size": 16, "checkpoint_every_s": 2},
            "capture": {"min_bucket_size": 16, "sampler": {"base_rate": 4.0}},
            "output": {"data_root": "data", "split_name": "bench"},
            "workflow": {"num_chunks": 6},
        }
        path = work / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    full_w = tmp / f"resume-full-{per_chunk}"
    path = config(full_w)
    t = time.perf_counter()
    _snakemake(full_w, path)
    full = time.perf_counter() - t
    full_timings = [json.loads(m.read_text())["timings"] for m in (full_w / "data/staging").glob("chunk-*/manifest.json")]
    forward = statistics.median(t["forward_s"] for t in full_timings)
    full_jobs = sum(t["total_s"] for t in full_timings)

    kill_w = tmp / f"resume-kill-{per_chunk}"
    path = config(kill_w)
    proc = _snakemake(kill_w, path, wait=False)
    deadline = time.time() + 1800
    staging = kill_w / "data/staging"
    running = None
    while time.time() < deadline:
        finished = {m.parent for m in staging.glob("chunk-*/manifest.json")}
        if len(finished) >= 4:
            running = next((d for d in staging.glob("chunk-*") if d not in finished and _journal_done(d)), None)
            if running is not None and _journal_done(running) >= per_chunk // 2:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(staging.glob("chunk-*/manifest.json")))
    salvaged = _journal_done(running) if running is not None else 0
    _snakemake(kill_w, path, "--unlock")
    before = {m.parent.name for m in staging.glob("chunk-*/manifest.json")}
    t = time.perf_counter()
    _snakemake(kill_w, path, "--rerun-incomplete")
    rerun = time.perf_counter() - t
    redone = []  # what the rerun's chunk jobs did, so that an odd figure can be traced
    rerun_jobs = 0.0
    for m in sorted(staging.glob("chunk-*/manifest.json")):
        if m.parent.name not in before:
            man = json.loads(m.read_text())
            how = f"resumed after {man['resumed']['examples']}" if man.get("resumed") else "whole"
            redone.append(f"{m.parent.name} {how} {man['timings']['total_s']:.0f} s")
            rerun_jobs += man["timings"]["total_s"]
    case = f"6 chunks x {per_chunk} examples (median forward {forward:.1f} s each)"
    return [
        dict(benchmark="resume",
             case=f"{case}, killed after {done_before} chunks + {salvaged} examples of the 5th (checkpointed); "
                  f"the rerun ran {', '.join(redone)}",
             a=f"rerun {rerun:.1f} s", b=f"full run {full:.1f} s", ratio=round(rerun / full, 3), goal=GOALS["resume"]),
        # what resuming itself controls: the chunk jobs' own time (start-up, forward, assembling the files), without
        # Snakemake and the stages after the chunks, which both runs pay in full
        dict(benchmark="resume", case=f"{case}; the chunk jobs alone (their recorded total time)",
             a=f"rerun's chunk jobs {rerun_jobs:.1f} s", b=f"full run's chunk jobs {full_jobs:.1f} s",
             ratio=round(rerun_jobs / full_jobs, 3), goal="report"),
    ]


LONGCTX_LENGTHS = "4096,8192,16384,32768,65536"
LONGCTX_MASK_GIB = 10.0  # (c) is skipped where its [B, 1, L, L] mask alone would take more than this


def _mask_gib(batch: int, length: int) -> float:
    """What the padding-mask path materializes for its mask on the CPU: transformers' boolean [B, 1, L, L] mask
    (1 byte an element) and the float copy of it torch's CPU SDPA makes (4 bytes an element)."""
    return batch * length * length * 5 / 2**30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc: the high-water mark only


def _row_tokens(n: int, vocab: int) -> np.ndarray:
    """A row of ``n`` random tokens, the same for every case that has a row of that length."""
    return np.random.default_rng(n).integers(5, vocab, size=n)


def _longctx_child() -> None:
    """One (variant, lengths) case of ``longctx`` in a process of its own; prints a JSON line.

    ``capture``: qk-sniffer's Capturer (right padding, no mask) over rows of ``lengths``.
    ``masked``: a plain transformers copy of the model (sdpa) over the same rows padded to the longest, with a
    padding mask, stopped where the capture run stops (after the last layer's attention).
    """
    import torch

    from qk_sniffer.config import validate_config
    from qk_sniffer.modeling import attention_modules, backbone_of

    job = json.loads(sys.argv[1])
    model_dir, lengths = job["model"], job["lengths"]
    cfg = validate_config({
        "dataset": {"path": "json", "data_files": str(REPO / "config/demo/corpus.jsonl")},
        "model": {"name": model_dir, "dtype": "float32"},
        "capture": {"sampler": {"type": "log_uniform"}},  # the default capture settings, every layer
        "output": {"data_root": job["root"], "split_name": "bench"},
    })
    if job["variant"] == "capture":
        from qk_sniffer.chunk.run import Capturer
        from qk_sniffer.modeling import load_model, resolve_capture

        model = load_model(cfg, torch.device("cpu"))
        capturer = Capturer(model, resolve_capture(cfg, model), pad_id=0)
        vocab = model.config.vocab_size

        def forward(lens: list[int]) -> None:
            rows = [_row_tokens(n, vocab) for n in lens]
            capturer.run_batch(rows, np.arange(len(rows))).wait()
    else:
        from transformers import AutoModelForCausalLM

        class Stop(Exception):
            pass

        def stop(module, args, output):
            raise Stop()

        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32).eval()
        backbone = backbone_of(model)
        mods = attention_modules(backbone)
        mods[max(mods)].register_forward_hook(stop)
        vocab = model.config.vocab_size

        def forward(lens: list[int]) -> None:
            ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, n in enumerate(lens):
                ids[i, :n] = torch.as_tensor(_row_tokens(n, vocab))
                mask[i, :n] = 1
            with torch.inference_mode():
                try:
                    backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                except Stop:
                    pass

    forward([max(1, n // 64) for n in lengths])  # warm-up: kernels and allocator, at a small size
    base = _status_kib("VmRSS")
    times, cpu = [], []
    while True:  # one forward; short ones again (up to 3, median) while it costs little
        t, c = time.perf_counter(), time.process_time()
        forward(lengths)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if len(times) >= 3 or sum(times) > 10:
            break
    print(json.dumps({"base_mib": base / 1024, "peak_mib": _status_kib("VmHWM") / 1024, "time_s": statistics.median(times),
                      "cpu_s": statistics.median(cpu), "reps": len(times)}))


def bench_longctx(args, tmp: Path) -> list[dict]:
    """Peak RSS and time of one capture forward at long contexts on the CPU, each case in a process of its own.

    (a) batch 1 of L tokens and of 3L/4 tokens, (b) the padded batch of 2 (L and 3L/4) through the Capturer (no
    mask), (c) the same batch as transformers runs it with a padding mask (sdpa, a [2, 1, L, L] mask), skipped
    where that mask alone would exceed LONGCTX_MASK_GIB.
    """
    from qk_sniffer.tiny_checkpoints import build_model as build

    model_dir = tmp / "model-longctx"
    lengths = [int(s) for s in str(args.longctx).split(",")]
    if not (model_dir / "config.json").exists():  # the tiny Llama's recipe (models/tiny/llama), positions to 64k
        build("llama", model_dir, seed=0, max_position_embeddings=max(65536, *lengths))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def case(variant: str, lens: list[int]) -> dict:
        job = {"model": str(model_dir), "variant": variant, "lengths": lens, "root": str(tmp / "longctx-root")}
        print(f"  longctx {variant} {lens} ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, "-c", "from benchmarks.run import _longctx_child; _longctx_child()",
                              json.dumps(job)], capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"longctx {variant} {lens} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        res["own_mib"] = res["peak_mib"] - res["base_mib"]  # the forward's own peak, over the loaded model
        print(f"    {res}", file=sys.stderr, flush=True)
        return res

    def mem(r: dict) -> str:
        return f"peak {r['peak_mib']:,.0f} MiB (+{r['own_mib']:,.0f})"

    rows, detail = [], []
    goal_b = "time <= 1.15 x (a) L + (a) 3L/4; memory report"
    for L in lengths:
        q = 3 * L // 4
        a_l, a_q, b = case("capture", [L]), case("capture", [q]), case("capture", [L, q])
        t_a, m_a = a_l["time_s"] + a_q["time_s"], a_l["own_mib"] + a_q["own_mib"]
        rows.append(dict(
            benchmark="longctx", case=f"L={L}: (b) padded batch 2x[{L}, {q}], no mask, vs (a) batch 1 of each",
            a=f"(b) {b['time_s']:.2f} s, {mem(b)}",
            b=f"(a) {a_l['time_s']:.2f} + {a_q['time_s']:.2f} s, {mem(a_l)} / {mem(a_q)}",
            ratio=f"time {b['time_s'] / t_a:.3f}, memory {b['own_mib'] / max(m_a, 1e-9):.2f}", goal=goal_b))
        detail += [(L, f"(a) 1x{L}", a_l), (L, f"(a) 1x{q}", a_q), (L, f"(b) 2x[{L}, {q}] no mask", b)]
        gib = _mask_gib(2, L)
        if gib > LONGCTX_MASK_GIB:
            rows.append(dict(benchmark="longctx", case=f"L={L}: (c) transformers, padding mask, vs (b)",
                             a=f"(c) skipped: its mask alone ~{gib:,.0f} GiB > {LONGCTX_MASK_GIB:.0f} GiB",
                             b=f"(b) {b['time_s']:.2f} s, {mem(b)}", ratio="-", goal="report"))
            detail.append((L, f"(c) 2x{L} padding mask: skipped, mask ~{gib:,.0f} GiB", None))
            continue
        c = case("masked", [L, q])
        rows.append(dict(
            benchmark="longctx", case=f"L={L}: (c) transformers, padding mask ([2, 1, L, L], ~{gib:.2f} GiB), vs (b)",
            a=f"(c) {c['time_s']:.2f} s, {mem(c)}", b=f"(b) {b['time_s']:.2f} s, {mem(b)}",
            ratio=f"time {c['time_s'] / b['time_s']:.2f}, memory {c['own_mib'] / max(b['own_mib'], 1e-9):.1f}",
            goal="report; memory (b) well under (c)"))
        detail.append((L, f"(c) 2x{L} padding mask", c))
    lines = ["| L | case | time | CPU time | reps | load baseline RSS | peak RSS | forward's own peak |",
             "|---|---|---|---|---|---|---|---|"]
    for L, what, r in detail:
        if r is None:
            lines.append(f"| {L} | {what} | - | - | - | - | - | - |")
        else:
            lines.append(f"| {L} | {what} | {r['time_s']:.2f} s | {r['cpu_s']:.2f} s | {r['reps']} | {r['base_mib']:,.0f} MiB | "
                         f"{r['peak_mib']:,.0f} MiB | {r['own_mib']:,.0f} MiB |")
    EXTRA.append("longctx, every case in a process of its own (tiny random Llama, 4 layers, float32, CPU, log_uniform "
                 "sampler, all layers; time and CPU time (all threads) of the forward: medians of the reps; load baseline: "
                 "RSS after loading and a small warm-up forward; own peak: peak RSS over that):\n\n" + "\n".join(lines))
    return rows


BENCHES = {
    "capture": bench_capture,
    "early": bench_early,
    "padding": bench_padding,
    "plan": bench_plan,
    "memory": bench_memory,
    "merge": bench_merge,
    "resume": bench_resume,
    "checkpoint": bench_checkpoint,
    "longctx": bench_longctx,
    "extend": bench_extend,
}


def machine() -> dict:
    import torch
    import transformers

    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | case | measured | against | ratio | goal |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['case']} | {r['a']} | {r['b']} | {r['ratio']} | {r['goal']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", help=f"benchmarks to run: {', '.join(BENCHES)} (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--seq", default="512", help="comma-separated sequence lengths")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch = tokens // seq, at least 1)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--longctx", default=LONGCTX_LENGTHS, help="comma-separated lengths L of the longctx benchmark")
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--note", default="", help="a line recorded with the results")
    args = ap.parse_args(argv)
    args.seq = [int(s) for s in str(args.seq).split(",")]
    which = args.which or list(BENCHES)
    unknown = sorted(set(which) - set(BENCHES))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qk-bench-") as d:
        for name in which:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows += BENCHES[name](args, Path(d))
    info = machine()
    text = "\n\n".join([table(rows), *EXTRA])
    print(text)
    if not args.no_record:
        with open(RESULTS, "a", encoding="utf-8") as fh:
            fh.write(f"\n## {info['date']}\n\n")
            fh.write("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "date") + "\n")
            fh.write(f"Command: `python -m benchmarks {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
            if args.note:
                fh.write(f"\n{args.note}\n")
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
