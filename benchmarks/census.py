"""Compatibility census: qk-sniffer's capture on a tiny instance of every causal-LM type transformers ships.

    python -m benchmarks.census [--out benchmarks/CENSUS.md] [--only TYPE,...] [--timeout S] [--jobs N] [--core REV] [--keep]

Each type runs in its own subprocess (a crash or hang loses only that type): build a tiny perturbed
checkpoint (benchmarks/census_build.py), record an independent reference (benchmarks/census_reference.py)
on a fresh load (an attention function of the census's own records every call's query/key per layer, wrappers around the modeling
module's ``apply_rotary*`` functions record their inputs), then capture post-RoPE and pre-RoPE through
qk-sniffer's public path with every token kept and compare every captured vector within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .census_build import BuildError, build_tiny, causal_types, one_line, skip_reason
from .census_reference import Recorder, pre_rope_reference, reference

TOL = 1e-5
LENGTHS = (40, 31, 23)
TEXTS = [
    "Queries and keys meet in a dot product inside every attention layer; the scores are scaled, masked and "
    "normalised, and the values they weight flow on to the next block of the model, one token after another.",
    "The quick brown fox jumps over the lazy dog again and again, until the dog wakes up, stretches, looks "
    "around the garden and decides that the fox is not worth chasing on such a warm afternoon.",
    "Return a new list containing all items from the iterable in ascending order; a custom key function can "
    "be supplied to customise the sort order, and the reverse flag can be set to request descending order.",
]
OUTCOMES = ("exact", "silently wrong", "refused", "crash/unclear", "not built")
ROOT = Path(__file__).resolve().parent.parent


# -- capture and comparison ---------------------------------------------------------------------

def _resolve(cfg, model):
    from qk_sniffer.modeling import resolve_capture

    try:
        return resolve_capture(cfg, model)
    except (TypeError, AttributeError):
        return resolve_capture(cfg, model.config)


def capture(ckpt: Path, pre: bool, attn: str, seqs, work: Path):
    import numpy as np
    import torch

    from qk_sniffer.chunk.run import Capturer
    from qk_sniffer.config import validate_config
    from qk_sniffer.modeling import load_model

    cfg = validate_config({
        "dataset": {"path": "json", "data_files": str(work / "unused.jsonl")},
        "model": {"name": str(ckpt), "attn_implementation": attn},
        "capture": {"capture_pre_rope": pre, "sampler": {"type": "all"}, "min_bucket_size": 4},
        "output": {"data_root": str(work / "out"), "split_name": "census"},
    })
    model = load_model(cfg, torch.device("cpu"))
    capturer = Capturer(model, _resolve(cfg, model), pad_id=0, padding_side="right")
    try:
        example_ids = np.arange(len(seqs)) + 100
        capturer.run_batch(seqs, example_ids).wait()  # warm-up, as sniff-chunk does
        batch = capturer.run_batch(seqs, example_ids)
        batch.wait()
    finally:
        capturer.close()
    return batch


def compare(batch, rec: Recorder, pre: bool, lengths, rope_unseen: bool) -> dict:
    import numpy as np
    import torch

    if not rec.attn:
        return {"status": "unverified", "diff": 0.0, "note": f"captured {len(batch.items)} (layer, kind) groups; the reference "
                "recorded no attention call (the model bypasses the attention interface), so nothing was checked"}
    tokens = {(r, c) for r, n in enumerate(lengths) for c in range(n)}
    seen = Counter()
    worst, problems, unverified, how_seen = 0.0, [], set(), set()
    for layer, kind, plan, tensor, _window in batch.items:
        n = seen[(layer, kind)]
        seen[(layer, kind)] += 1
        calls = rec.attn.get(layer, [])
        if n >= len(calls):
            problems.append(f"layer {layer} {kind}: captured {n + 1}x, attention ran {len(calls)}x")
            continue
        states, how = calls[n][0 if kind == "q" else 1], "post"
        if pre:
            states, how = pre_rope_reference(states, rec.rot.get(layer, []), kind)
            if how is None or (how == "none" and rope_unseen):
                unverified.add(layer)
            how_seen.add(how)
        rows, cols = np.asarray(plan.host_rows), np.asarray(plan.host_cols)
        covered = set(zip(rows.tolist(), cols.tolist()))
        if covered != tokens:
            problems.append(f"layer {layer} {kind}: rows cover {len(covered)}/{len(tokens)} tokens")
        if getattr(plan, "per_head", False):
            expect = states[rows, np.asarray(plan.row_head), cols]
        else:
            expect = states[rows[:, None], np.asarray(plan.heads)[None, :], cols[:, None]]
        got = torch.as_tensor(tensor).float()
        if got.shape != expect.shape:
            problems.append(f"layer {layer} {kind}: shape {tuple(got.shape)} vs reference {tuple(expect.shape)}")
            continue
        diff = float((got - expect.float()).abs().max()) if got.numel() else 0.0
        worst = max(worst, diff)
        if diff > TOL and layer not in unverified:
            against = {"input": ", vs the rotation's input", "none": ", layer without rotation: vs the attention input"}
            problems.append(f"layer {layer} {kind}: max diff {diff:.1e}{against.get(how, '')}")
    missed = sorted({layer for layer in rec.attn if layer >= 0} - {layer for layer, _ in seen})
    if missed:
        problems.append(f"attention layers {missed} not captured")
    dups = sorted({layer for (layer, _), c in seen.items() if c > 1})
    if dups:
        problems.append(f"duplicate captures in layers {dups}")
    once = sorted({layer for layer, c in rec.attn.items() if 0 < max(seen[(layer, "q")], seen[(layer, "k")]) < len(c)})
    if once:
        problems.append(f"attention ran {len(rec.attn[once[0]])}x in layers {once}, captured once, no error")
    if not batch.items:
        problems.append("nothing captured")
    note = ["pre-RoPE reference: the rotation's input (transformed before attention)"] if "input" in how_seen else []
    if problems:
        return {"status": "wrong", "diff": worst, "note": "; ".join(problems[:3])}
    if unverified:
        return {"status": "unverified", "diff": worst,
                "note": f"rotation not located in layers {sorted(unverified)}; pre-RoPE not checked (diff {worst:.1e})"}
    return {"status": "exact", "diff": worst, "note": "; ".join(note)}


def classify_error(exc: BaseException, pre: bool) -> dict:
    """refused: one of qk_sniffer's errors (or a RuntimeError/ValueError it raised) in one line; else crash."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_here = tb is not None and "qk_sniffer" in Path(tb.tb_frame.f_code.co_filename).parts
    ours = type(exc).__module__.startswith("qk_sniffer") or (raised_here and isinstance(exc, (RuntimeError, ValueError)))
    msg = one_line(exc, where=not ours)
    if not ours:
        return {"status": "crash", "note": msg}
    if len(str(exc).strip().splitlines()) > 1:
        return {"status": "crash", "note": f"multi-line qk_sniffer error: {msg}"}
    if type(exc).__name__ == "ConfigError" and not (pre and "pre_rope" in str(exc)):
        return {"status": "crash", "note": f"blames the config: {msg}"}
    return {"status": "refused", "note": msg}


# -- one type, in a child process ---------------------------------------------------------------

def run_child(model_type: str, work: Path, tok_dir: Path, out: Path) -> None:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    if os.environ.get("QK_CENSUS_CORE"):  # --core: qk_sniffer from an exported revision, not this checkout
        sys.path.insert(0, os.environ["QK_CENSUS_CORE"])
    res: dict = {"type": model_type, "stage": "build"}

    def save(stage: str | None = None):
        res["stage"] = stage or res["stage"]
        out.write_text(json.dumps(res))

    save()
    ckpt = work / "ckpt"
    try:
        res["class"] = build_tiny(model_type, ckpt, tok_dir)
    except BuildError as exc:
        res["build_error"] = str(exc)
        return save("done")
    tok = AutoTokenizer.from_pretrained(ckpt)
    seqs = [tok(t)["input_ids"][:n] for t, n in zip(TEXTS, LENGTHS)]
    lengths = [len(s) for s in seqs]
    ids = np.full((len(seqs), max(lengths)), tok.pad_token_id)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    save("reference")
    try:
        rec, rope_unseen, inner = reference(ckpt, *(torch.as_tensor(a) for a in (ids, mask, pos)))
    except Exception as exc:  # noqa: BLE001
        res["build_error"] = f"reference load/forward fails: {one_line(exc, where=True)}"
        return save("done")
    res["attn"] = inner
    for key, pre in (("post", False), ("pre", True)):
        save(key)
        try:
            batch = capture(ckpt, pre, "sdpa" if inner == "sdpa" else "eager", seqs, work)
            res[key] = compare(batch, rec, pre, lengths, rope_unseen)
        except Exception as exc:  # noqa: BLE001
            res[key] = classify_error(exc, pre)
    save("done")


# -- the census ---------------------------------------------------------------------------------

def outcome(res: dict) -> str:
    if "class" not in res or res.get("build_error"):
        return "not built"
    post, pre = (res.get(k, {}).get("status", "crash") for k in ("post", "pre"))
    if "wrong" in (post, pre):
        return "silently wrong"
    if "crash" in (post, pre) or "unverified" in (post, pre):
        return "crash/unclear"
    if post == "refused":
        return "refused"
    return "exact"


def run_one(model_type: str, root: Path, tok_dir: Path, timeout: float, core: Path | None) -> dict:
    work = root / model_type
    work.mkdir(parents=True, exist_ok=True)
    out = work / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.census", "--child", model_type, "--work", str(work), "--tokenizer", str(tok_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore", **({"QK_CENSUS_CORE": str(core)} if core else {})}
    t0 = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    res = json.loads(out.read_text()) if out.exists() else {"type": model_type, "stage": "start"}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    if res.get("stage") != "done":
        why = f"timeout after {timeout:.0f} s" if rc is None else f"process died (rc {rc})"
        tail = [ln for ln in (work / "log.txt").read_text(errors="replace").splitlines() if ln.strip()][-1:]
        why += f": {tail[0][:120]}" if tail and rc is not None else ""
        if res["stage"] in ("start", "build", "reference"):
            res["build_error"] = f"{why} while {'building' if res['stage'] != 'reference' else 'running the reference'}"
        else:
            res[res["stage"]] = {"status": "crash", "note": why}
    return res


def _cell(part: dict | None) -> str:
    if not part:
        return "—"
    s = part["status"]
    return f"{s} ({part['diff']:.0e})" if "diff" in part and s != "refused" else s


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def export_core(rev: str, dest: Path) -> str:
    """``git archive`` of ``rev`` into ``dest`` (read-only for the repository); return its short hash."""
    sha = git("rev-parse", "--short", rev)
    if not sha:
        raise SystemExit(f"--core: {rev!r} is not a revision of {ROOT}")
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return sha


def render(results: list[dict], skipped: dict[str, str], partial: bool, core: str) -> str:
    import datetime

    import torch
    import transformers

    def esc(t: str) -> str:
        return t.replace("|", "\\|").replace("\n", " ")

    totals = Counter(outcome(r) for r in results)
    lines = [
        "# qk-sniffer compatibility census", "",
        f"Generated {datetime.date.today().isoformat()} by `python -m benchmarks.census`{' --only ...' if partial else ''}: "
        f"transformers {transformers.__version__}, torch {torch.__version__}, qk-sniffer {core}.",
        "Every causal-LM type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built tiny with random perturbed weights, captured "
        f"post- and pre-RoPE with every token kept and compared with an independent reference (tolerance {TOL:g}); "
        "benchmarks/README.md says how.", "",
        "| outcome | types |", "|---|---|",
        *(f"| {o} | {totals.get(o, 0)} |" for o in OUTCOMES),
        f"| skipped | {len(skipped)} |", "",
        "| type | class | post-RoPE | pre-RoPE | outcome | note |", "|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: r["type"]):
        o = outcome(r)
        if o == "not built":
            note = r.get("build_error", "")
        else:
            notes = {k: r[k]["note"] for k in ("post", "pre") if r.get(k, {}).get("note")}
            same = len(notes) == 2 and notes["post"] == notes["pre"]
            note = f"post/pre: {notes['post']}" if same else "; ".join(f"{k}: {v}" for k, v in notes.items())
            note = (f"attention: {r['attn']}; " if r.get("attn", "sdpa") != "sdpa" else "") + note
        lines.append(f"| {r['type']} | {r.get('class', '—')} | {_cell(r.get('post'))} | {_cell(r.get('pre'))} | {o} | "
                     f"{esc(note)[:400]} |")
    lines += ["", "## Skipped", "", "| type | reason |", "|---|---|"]
    lines += [f"| {t} | {esc(why)} |" for t, why in sorted(skipped.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="markdown output (default benchmarks/CENSUS.md; with --only, stdout)")
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model type (default 120)")
    ap.add_argument("--jobs", type=int, default=2, help="types run at once (default 2)")
    ap.add_argument("--core", metavar="REV", help="census the qk_sniffer of git revision REV (default: the working tree)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints, logs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args.child, Path(args.work), Path(args.tokenizer), Path(args.work) / "result.json")
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    types = causal_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = sorted(set(wanted) - set(types))
        if unknown:
            ap.error(f"not causal-LM types: {', '.join(unknown)}")
        types = sorted(set(wanted))
    skipped = {t: why for t in types if (why := skip_reason(t))}
    todo = [t for t in types if t not in skipped]
    from qk_sniffer.tiny_checkpoints import build_tokenizer

    root = Path(tempfile.mkdtemp(prefix="qk-census-"))
    build_tokenizer(root / "tokenizer", vocab_size=512)
    core_dir = None
    if args.core:
        core_dir = root / "core"
        core = f"at commit {export_core(args.core, core_dir)} (--core {args.core})"
    else:
        dirty = " with uncommitted changes under qk_sniffer/" if git("status", "--porcelain", "qk_sniffer") else ""
        core = f"working tree at {git('rev-parse', '--short', 'HEAD') or '?'}{dirty}"
    t0 = time.perf_counter()
    results = []
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = [pool.submit(run_one, t, root, root / "tokenizer", args.timeout, core_dir) for t in todo]
        for i, fut in enumerate(futures):
            res = fut.result()
            results.append(res)
            print(f"[{i + 1}/{len(todo)}] {res['type']}: {outcome(res)} ({res['seconds']} s)", flush=True)
    text = render(results, skipped, partial=bool(args.only), core=core)
    out = args.out or (None if args.only else str(ROOT / "benchmarks" / "CENSUS.md"))
    if out:
        Path(out).write_text(text, encoding="utf-8")
        print(f"wrote {out} ({len(results)} types in {time.perf_counter() - t0:.0f} s)")
    else:
        print(text)
    if args.keep:
        print(f"work directory: {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
