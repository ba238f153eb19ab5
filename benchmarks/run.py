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
}

# model shapes (Llama architecture, random weights)
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64),
}


def median_ratio(fa, fb, reps: int, warmup: int = 1) -> tuple[float, float, float]:
    """(median a, median b, median a / median b) with a and b interleaved."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(reps):
        t = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t)
    ma, mb = statistics.median(ta), statistics.median(tb)
    return ma, mb, ma / mb


def build_model(size: str, out: Path) -> Path:
    from models.tiny.recipes import build_model as build

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


class Forward:
    """The backbone forward with and without capture over the same batches."""

    def __init__(self, model_dir: Path, root: Path, device: str, dtype: str, batch: int, seq: int, layers=None):
        import torch
        from transformers import AutoModelForCausalLM

        from qk_sniffer.chunk import Capturer
        from qk_sniffer.modeling import DTYPES, backbone_of, load_model, resolve_capture
        from qk_sniffer.writer import ChunkWriter

        self.torch = torch
        self.device = torch.device(device)
        cfg = _cfg(model_dir, root, layers=layers)
        cfg["model"]["dtype"] = dtype
        self.model = load_model(cfg, self.device)
        spec = resolve_capture(cfg, self.model.config)
        self.capturer = Capturer(self.model, spec, pad_id=0)
        n_q = self.model.config.num_attention_heads
        self.writer = ChunkWriter(root / "staging" / "chunk-0", "bench", head_dim=spec.head_dim,
                                  n_layers=self.model.config.num_hidden_layers, n_heads=n_q)
        self.plain = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa",
                                                          dtype=DTYPES[dtype]).to(self.device).eval()
        self.plain_backbone = backbone_of(self.plain)
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

    def baseline(self):
        with self.torch.inference_mode():
            self.plain_backbone(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=False)
        self.sync()

    def captured(self):
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
        ma, mb, r = median_ratio(fw.captured, fw.baseline, args.reps)
        fw.close()
        rows.append(dict(benchmark="capture", case=f"{args.size} {args.device} {args.dtype} {batch}x{seq}",
                         a=f"with capture {ma * 1e3:.1f} ms", b=f"plain forward {mb * 1e3:.1f} ms",
                         ratio=round(r, 3), goal=GOALS["capture"]))
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
                         a=f"layer 0 only {ma * 1e3:.1f} ms", b=f"all layers {mb * 1e3:.1f} ms", ratio=round(r, 3),
                         goal=f"<= {1 / n_layers + 0.10:.3f}"))
    return rows


def bench_padding(args, tmp: Path) -> list[dict]:
    from qk_sniffer.data import length_sorted_batches

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
from qk_sniffer.chunk import run_chunk
cfg = validate_config(json.loads(sys.argv[1]))
run_chunk(cfg, 0, 1)
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


BENCHES = {
    "capture": bench_capture,
    "early": bench_early,
    "padding": bench_padding,
    "plan": bench_plan,
    "memory": bench_memory,
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
    text = table(rows)
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
