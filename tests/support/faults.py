"""Fault injection: SIGKILL the whole workflow at seeded random moments, resume it, compare with a clean run.

Each trial runs the tiny-model workflow (``snakemake -s Snakefile --directory WORK --configfile CFG
--cores 2`` in its own process group, pushing to a repository on the fake Hub of tests/support/fakehub.py,
which runs in this process) and kills the process group with SIGKILL at a moment chosen by a seeded
random generator, inside one of four stages:

- ``sniff_chunk``: once a chosen chunk's log appears, after a random part of that chunk's duration
  (start-up and model loading, mostly), or once its progress bar shows that its batches started,
  after a random part of their duration (mid-batch, or while the chunk's files are written);
- ``merge_staging``: once the merge log appears, or once the merge's first temporary file appears in
  ``final/`` (the moment it starts writing), after a random delay;
- ``render_readme``: once its log appears, after a random part of the stage's duration;
- ``push_hub``: the moment the fake Hub sees the push's first preupload, LFS batch, LFS upload or
  commit request, or after the fake has applied a commit and dropped the connection instead of
  answering (the push is killed while it waits to retry).

After every kill the remote must hold no half commit (every commit on the branch: its Parquet
files read, its README lists only files present, no temporary names) and nothing in the data root
may be a damaged file. Then ``--unlock`` and ``--rerun-incomplete`` until the workflow completes (a
rerun is itself killed in some trials). The result must equal an uninterrupted reference run of
the same config: the same rows in every config, the same README ``configs``, the remote's files
equal to ``final/`` byte for byte, ``qk_sniffer.verify`` passing, and no temporary file left in the
data root or the remote.

Trials aimed at the stages after the chunks start from a copy of the reference's working directory
taken once its chunks were staged, so only the sniff_chunk trials pay for the model runs. The full
run, 20 trials (about 10 minutes on 2 cores), from the repository root:

    python -m tests.support.faults --trials 20 --seed 0

(``QK_FAULT_TRIALS=20 pytest tests/test_faults.py -k random`` runs the same through pytest.)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from qk_sniffer.readme import split_front_matter
from qk_sniffer.remote import local_files
from qk_sniffer.verify import verify

from .fakehub import FakeHub
from .rows import assert_same_rows
from .workflow_runs import copy_workdir, final_files, make_workdir, manifests, snakemake_cmd, write_yaml

STAGES = ("sniff_chunk", "merge_staging", "render_readme", "push_hub")
PUSH_TRIGGERS = ("preupload", "lfs_batch", "lfs_put", "commit", "commit_answer_lost")
NUM_CHUNKS = 3
SPLIT = "tiny"
USER = "tester"
RUN_TIMEOUT = 600.0  # seconds for one snakemake invocation
MAX_RERUNS = 4  # --rerun-incomplete attempts after the first kill
SECOND_KILL_P = 0.3  # share of trials whose first rerun is killed as well,
SECOND_KILL_WITHIN = 8.0  # at most this many seconds after it started (a rerun of the late stages takes about 10)
POLL = 0.005
# outputs of the rules, relative to the data root, in the order the workflow makes them
TARGETS = {
    "pull_hub": "final/.snapshot.json",
    "merge_staging": "final/.merged.json",
    "render_readme": "final/README.md",
    "verify_dataset": "verify.json",
    "push_hub": "push.json",
}
TEMP_MARKERS = (".tmp", ".pull-tmp-")


# -- config, environment, file checks ----------------------------------------------------------


# each trial's config: the tiny Llama, 24 examples in 3 chunks of 4 batches
WORKDIR_SECTIONS = {
    "dataset": {"max_samples": 24},
    "tokenizer": {"max_length": 48},
    # a checkpoint after every batch, so a kill inside a chunk leaves segments that the rerun resumes from
    "inference": {"batch_size": 2, "checkpoint_every_s": 1e-9},
    "workflow": {"num_chunks": NUM_CHUNKS},
}


def trial_workdir(path: Path, repo_id: str | None, **sections) -> Path:
    """A working directory holding ``cfg.yaml`` (``WORKDIR_SECTIONS``, pushing to ``repo_id`` when given), data root
    ``root`` (relative, so a copy of the directory is self-contained)."""
    output = {"hf_repo_id": repo_id} if repo_id else {}
    return make_workdir(path, {**WORKDIR_SECTIONS, "output": output}, **sections)


def hub_env(hub: FakeHub, token: str | None, hf_home: Path, gpu_locks: Path) -> dict[str, str]:
    """The environment of the snakemake process: the real client in every job talks to ``hub``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "QK_SNIFFER_"))}
    env.update({
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_UPDATE_DOWNLOAD_COUNTS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "QK_SNIFFER_GPUS": "",
        "QK_SNIFFER_GPU_LOCK_DIR": str(gpu_locks),
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    })
    if token:
        env["HF_TOKEN"] = token
    return env


def is_temp_name(name: str) -> bool:
    return any(m in name for m in TEMP_MARKERS)


def temp_files(base: Path) -> list[str]:
    """Temporary names (``.tmp``, ``.pull-tmp-``) anywhere under ``base``, relative to it."""
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if is_temp_name(p.name))


def glob_match(pattern: str, path: str) -> bool:
    """``path`` matches the ``data_files`` glob ``pattern`` (``*`` never crosses a ``/``)."""
    a, b = pattern.split("/"), path.split("/")
    return len(a) == len(b) and all(fnmatchcase(y, x) for x, y in zip(a, b))


def card_configs(card: bytes | str, source: str = "README.md") -> list:
    """The ``configs`` list of a dataset card's front matter."""
    text = card.decode("utf-8") if isinstance(card, bytes) else card
    return split_front_matter(text, source)[0].get("configs") or []


def card_globs(card: bytes | str, source: str = "README.md") -> dict[str, list[str]]:
    """Config name -> every ``data_files`` glob of the card's front matter."""
    text = card.decode("utf-8") if isinstance(card, bytes) else card
    fm, _ = split_front_matter(text, source)
    out: dict[str, list[str]] = {}
    for entry in fm.get("configs") or []:
        globs = out.setdefault(entry["config_name"], [])
        for item in entry.get("data_files") or []:
            paths = item["path"]
            globs.extend([paths] if isinstance(paths, str) else paths)
    return out


def tree_problems(files: dict[str, bytes], where: str) -> list[str]:
    """Why a published tree is not a complete state: unreadable Parquet, temporary names, a card naming absent files."""
    problems = [f"{where}: temporary file {p}" for p in files if any(is_temp_name(part) for part in p.split("/"))]
    for path, data in sorted(files.items()):
        if path.endswith(".parquet"):
            try:
                pq.read_table(pa.BufferReader(data))
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the finding
                problems.append(f"{where}: {path} is not readable Parquet ({type(exc).__name__}: {exc})")
    if "README.md" in files:
        try:
            globs = card_globs(files["README.md"], f"{where}:README.md")
        except Exception as exc:  # noqa: BLE001
            return [*problems, f"{where}: README.md front matter does not parse ({exc})"]
        for name, patterns in sorted(globs.items()):
            for pattern in patterns:
                if not any(glob_match(pattern, p) for p in files):
                    problems.append(f"{where}: README.md config {name} lists {pattern}, which matches no file")
    return problems


def remote_problems(hub: FakeHub, repo_id: str) -> list[str]:
    """Every commit ever on the branch must be a complete state (no repository at all is one too)."""
    if hub.head(repo_id) is None:
        return []
    problems = []
    for commit in hub.history(repo_id):
        problems += tree_problems({p: b.data for p, b in commit.files.items()}, f"remote commit {commit.sha[:10]}")
    return problems


def local_problems(root: Path) -> list[str]:
    """Files of the data root that exist but are damaged (what a kill may never leave behind)."""
    problems = []
    for rel in [*TARGETS.values(), "staging/chunk-*/manifest.json"]:
        for p in sorted(root.glob(rel)):
            if p.suffix == ".json":
                try:
                    json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    problems.append(f"{p.relative_to(root)} is not readable JSON ({exc})")
    readme = root / "final" / "README.md"
    if readme.is_file():
        try:
            card_globs(readme.read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001
            problems.append(f"final/README.md front matter does not parse ({exc})")
    for sub in ("final", "staging"):
        for p in sorted((root / sub).rglob("*.parquet")):
            if is_temp_name(p.name):
                continue
            try:
                pq.read_table(p)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{p.relative_to(root)} is not readable Parquet ({type(exc).__name__}: {exc})")
    return problems


def read_configs(root: Path) -> dict[str, pl.DataFrame]:
    """Config name -> its final rows sorted by (example_id, position)."""
    return {name: pl.read_parquet(p).sort(["example_id", "position"]) for name, p in final_files(root, SPLIT).items()}


def resumed_chunks(root: Path) -> int:
    """Chunk manifests that record a resume from checkpoints."""
    n = 0
    for mf in manifests(root).values():
        try:
            n += bool(json.loads(mf.read_text(encoding="utf-8")).get("resumed"))
        except (OSError, ValueError):
            pass
    return n


def incomplete_jobs(work: Path) -> list[str]:
    """Outputs Snakemake marked as being made when it died (its ``.snakemake/incomplete`` markers)."""
    out = []
    for marker in sorted((work / ".snakemake" / "incomplete").glob("*")):
        if marker.is_file() and marker.name != "migration_underway":
            try:
                out.append(base64.urlsafe_b64decode(marker.name.encode()).decode())
            except ValueError:
                out.append(marker.name)
    return out


def rule_of(output: str) -> str:
    if "/staging/chunk-" in f"/{output}":
        return "sniff_chunk"
    for rule, rel in TARGETS.items():
        if output.endswith(rel):
            return rule
    if "/report/" in f"/{output}/":
        return "render_report"
    return output


# -- running snakemake and killing it ----------------------------------------------------------


@dataclass
class KillPlan:
    """When to kill: ``trigger`` (polled) fires, then ``delay`` seconds pass. ``what`` names the moment."""

    stage: str
    what: str
    delay: float
    trigger: Callable[[], bool]


@dataclass
class Attempt:
    args: list[str]
    rc: int | None
    wall_s: float
    output: str
    killed: bool = False
    planned: str | None = None  # the stage the kill was aimed at
    what: str | None = None
    at_s: float | None = None  # seconds after the start
    running: list[str] = field(default_factory=list)  # rules Snakemake had marked incomplete
    temps: list[str] = field(default_factory=list)  # temporary files the kill left in the data root
    remote_head: str | None = None


def _reap_group(pgid: int, timeout: float = 30.0) -> None:
    """SIGKILL every process of the group until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:  # a zombie not yet reaped by its new parent
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"process group {pgid} survived SIGKILL for {timeout:.0f}s")
        time.sleep(0.05)


def run_snakemake(work: Path, env: dict, log: Path, *extra: str, plan: KillPlan | None = None,
                  timeout: float = RUN_TIMEOUT, on_kill: Callable[[], None] | None = None) -> Attempt:
    """Run snakemake in its own process group; with ``plan``, SIGKILL the group when it fires.

    ``on_kill`` runs right after the group is dead (before anything else looks at the state).
    """
    args = snakemake_cmd(work, *extra)
    start = time.monotonic()
    fire_at = None
    killed = False
    at = None
    running: list[str] = []
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now - start > timeout:
                    raise TimeoutError(f"snakemake {' '.join(extra)} in {work} ran past {timeout:.0f}s; output: {log}")
                if plan is not None and fire_at is None and plan.trigger():
                    fire_at = now + plan.delay
                if fire_at is not None and now >= fire_at:
                    os.killpg(proc.pid, signal.SIGKILL)
                    at = time.monotonic() - start
                    proc.wait(timeout=60)
                    _reap_group(proc.pid)
                    killed = True
                    running = incomplete_jobs(work)
                    if on_kill is not None:
                        on_kill()
                    break
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            with contextlib.suppress(RuntimeError):
                _reap_group(proc.pid, timeout=10)
    text = log.read_text(encoding="utf-8", errors="replace")
    return Attempt(args=list(extra), rc=None if killed else proc.returncode, wall_s=time.monotonic() - start,
                   output=text, killed=killed, planned=plan.stage if killed else None,
                   what=plan.what if killed else None, at_s=at, running=running)


# -- the reference run's timings ---------------------------------------------------------------


@dataclass
class Timings:
    """Seconds measured on the reference run: when each watched file first appeared after its phase started."""

    seen: dict[str, float] = field(default_factory=dict)
    forward_s: dict[int, float] = field(default_factory=dict)  # per chunk, from its manifest
    total: float = 30.0

    def span(self, start: str, end: str, default: float = 2.0) -> float:
        if start in self.seen and end in self.seen and self.seen[end] > self.seen[start]:
            return self.seen[end] - self.seen[start]
        return default

    def chunk(self, i: int) -> float:
        return self.span(f"logs/sniff_chunk/chunk-{i}.log", f"staging/chunk-{i}/manifest.json", 8.0)

    def forward(self, i: int) -> float:
        return self.forward_s.get(i, 0.5)

    @property
    def merge(self) -> float:
        return self.span("logs/merge_staging.log", TARGETS["merge_staging"])

    @property
    def merge_writing(self) -> float:
        """From the merge's first temporary file in final/ to its target."""
        return self.span("merge:first-temp", TARGETS["merge_staging"], 0.3)

    @property
    def readme(self) -> float:
        return self.span("logs/render_readme.log", TARGETS["render_readme"])


WATCHED = [f"logs/sniff_chunk/chunk-{i}.log" for i in range(NUM_CHUNKS)] + \
    [f"staging/chunk-{i}/manifest.json" for i in range(NUM_CHUNKS)] + \
    [f"logs/{r}.log" for r in TARGETS] + list(TARGETS.values())


def _final_temp(root: Path) -> bool:
    """A temporary file under final/data (a merge writing)."""
    base = root / "final" / "data"
    if not base.is_dir():
        return False
    with contextlib.suppress(OSError):
        for split in os.scandir(base):
            if split.is_dir():
                for cfg in os.scandir(split.path):
                    if cfg.is_dir() and any(is_temp_name(e.name) for e in os.scandir(cfg.path)):
                        return True
    return False


def _watch(root: Path, seen: dict[str, float]) -> Callable[[], bool]:
    """A trigger that never fires and records when each file of :data:`WATCHED` first appears."""
    start = time.monotonic()

    def poll() -> bool:
        now = time.monotonic() - start
        for rel in WATCHED:
            if rel not in seen and (root / rel).exists():
                seen[rel] = now
        if "merge:first-temp" not in seen and "logs/merge_staging.log" in seen and _final_temp(root):
            seen["merge:first-temp"] = now
        return False

    return poll


def set_repo(work: Path, repo_id: str) -> None:
    cfg = yaml.safe_load((work / "cfg.yaml").read_text(encoding="utf-8"))
    cfg["output"]["hf_repo_id"] = repo_id
    write_yaml(work / "cfg.yaml", cfg)


# -- trials ------------------------------------------------------------------------------------


@dataclass
class TrialResult:
    index: int
    stage: str
    repo_id: str
    attempts: list[Attempt]
    problems: list[str]
    wall_s: float
    resumed_chunks: int = 0  # chunks that resumed from their checkpoints instead of starting over

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def kills(self) -> list[Attempt]:
        return [a for a in self.attempts if a.killed]

    @property
    def reruns(self) -> int:
        return sum(1 for a in self.attempts if "--rerun-incomplete" in a.args)

    def describe(self) -> str:
        lines = [f"trial {self.index} ({self.stage}, {self.repo_id}): {'ok' if self.ok else 'FAILED'}, "
                 f"{len(self.kills)} kill(s), {self.reruns} rerun(s), {self.resumed_chunks} resumed chunk(s), "
                 f"{self.wall_s:.1f}s"]
        for a in self.kills:
            landed = ", ".join(sorted({rule_of(o) for o in a.running})) or "between jobs"
            temps = f"; left {len(a.temps)} temp file(s): {', '.join(a.temps[:3])}" if a.temps else ""
            lines.append(f"  kill at {a.at_s:.2f}s aimed at {a.planned} ({a.what}); running: {landed}{temps}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


class FaultHarness:
    """Kill-and-resume trials compared with one reference run; everything lives under ``base``.

    The fake Hub runs in this process (``hub``, else one started here with a fresh token); the
    snakemake processes reach it through ``HF_ENDPOINT`` and authenticate with ``HF_TOKEN``.
    Trials aimed at the stages after the chunks start from a copy of the reference's working
    directory taken when its chunks were staged (Snakemake's metadata and mtimes included), so only
    the sniff trials pay for the model runs.
    """

    def __init__(self, base: Path, seed: int = 0, hub: FakeHub | None = None, log: Callable[[str], None] = print):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.seed = seed
        self._own_hub = hub is None
        self.hub = hub if hub is not None else FakeHub(token="hf_" + secrets.token_hex(17)).start()
        self.token = self.hub.token
        self.log = log
        self.reference_work: Path | None = None
        self.staged_work: Path | None = None
        self.timings = Timings()
        self._ref: dict = {}

    def close(self) -> None:
        if self._own_hub:
            self.hub.stop()

    def __enter__(self) -> FaultHarness:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self, name: str) -> dict[str, str]:
        return hub_env(self.hub, self.token, self.base / "hf-home" / name, self.base / "gpu-locks")

    # ------------------------------------------------------------------ reference
    def reference(self) -> Path:
        """The uninterrupted run every trial is compared with (made once); returns its working directory."""
        if self.reference_work is not None:
            return self.reference_work
        repo = f"{USER}/faults-reference"
        work = trial_workdir(self.base / "reference", repo)
        root = work / "root"
        env = self.env("reference")
        manifests = [f"root/staging/chunk-{i}/manifest.json" for i in range(NUM_CHUNKS)]
        phases = []
        for name, targets in (("chunks", manifests), ("rest", [])):
            seen: dict[str, float] = {}
            res = run_snakemake(work, env, self.base / f"reference-{name}.log", *targets,
                                plan=KillPlan("none", "never", 0.0, _watch(root, seen)))
            if res.rc != 0:
                raise RuntimeError(f"the reference run failed ({res.rc}):\n{res.output[-6000:]}\n{_log_tails(root)}")
            self.timings.seen.update(seen)
            phases.append(res.wall_s)
            if name == "chunks":
                self.staged_work = copy_workdir(work, self.base / "staged")
        self.timings.total = sum(phases)
        for i in range(NUM_CHUNKS):
            man = json.loads((root / f"staging/chunk-{i}/manifest.json").read_text(encoding="utf-8"))
            self.timings.forward_s[i] = float(man["timings"]["forward_s"])
        configs = read_configs(root)
        card = card_configs((root / "final" / "README.md").read_text(encoding="utf-8"))
        self._ref = {"configs": configs, "card": card}
        problems = self.compare(work, repo)
        if problems:
            raise RuntimeError("the reference run itself is inconsistent:\n" + "\n".join(problems))
        self.reference_work = work
        t = self.timings
        self.log(f"reference: {len(configs)} configs, {sum(len(df) for df in configs.values())} rows, "
                 f"{t.total:.1f}s; chunk {t.chunk(0):.1f}s (batches {t.forward(0):.2f}s), merge {t.merge:.2f}s "
                 f"(writing {t.merge_writing:.2f}s), render_readme {t.readme:.2f}s")
        return work

    # ------------------------------------------------------------------ plans
    def plan(self, stage: str, rng: random.Random, work: Path, repo: str) -> KillPlan:
        """The kill moment of a trial; every random draw happens here, before anything runs."""
        t = self.timings
        root = work / "root"
        if stage == "sniff_chunk":
            chunk = rng.randrange(NUM_CHUNKS)
            log = root / f"logs/sniff_chunk/chunk-{chunk}.log"
            if rng.random() < 0.5:  # anywhere in the job: start-up, model and dataset loading, batches
                delay = rng.uniform(0.0, t.chunk(chunk))
                return KillPlan(stage, f"chunk-{chunk} log + {delay:.2f}s", delay, log.exists)
            # once its batches start (the progress bar is printed): mid-batch, or while its files are written
            delay = rng.uniform(0.0, t.forward(chunk) + 0.1)

            def started() -> bool:
                with contextlib.suppress(OSError):
                    return b"sniff:" in log.read_bytes()
                return False
            return KillPlan(stage, f"chunk-{chunk} batches + {delay:.2f}s", delay, started)
        if stage == "merge_staging":
            log = root / "logs/merge_staging.log"
            target = root / TARGETS["merge_staging"]
            if rng.random() < 0.5:  # while it writes final/
                delay = rng.uniform(0.0, t.merge_writing)
                return KillPlan(stage, f"first temp file in final/ + {delay:.3f}s", delay,
                                lambda: log.exists() and (_final_temp(root) or target.exists()))
            delay = rng.uniform(0.0, t.merge)
            return KillPlan(stage, f"merge log + {delay:.2f}s", delay, log.exists)
        if stage == "render_readme":
            log = root / "logs/render_readme.log"
            delay = rng.uniform(0.0, t.readme)
            return KillPlan(stage, f"render_readme log + {delay:.2f}s", delay, log.exists)
        if stage == "push_hub":
            how = rng.choice(PUSH_TRIGGERS)
            api = f"/api/datasets/{repo}"
            method, pattern = {
                "preupload": ("POST", rf"^{api}/preupload/"),
                "lfs_batch": ("POST", rf"^/datasets/{repo}\.git/info/lfs/objects/batch"),
                "lfs_put": ("PUT", r"^/lfs-upload/"),
                "commit": ("POST", rf"^{api}/commit/"),
                "commit_answer_lost": ("POST", rf"^{api}/commit/"),
            }[how]
            regex = re.compile(pattern)
            first = len(self.hub.requests)  # only this trial's requests count
            nth = rng.randrange(1, 6) if how == "lfs_put" else 1
            if how == "commit_answer_lost":
                # the commit lands but its answer is lost: the client waits, then retries; kill meanwhile
                self.hub.fail_next("POST", pattern, "drop_after")
                delay = rng.uniform(0.0, 2.5)
                wanted: tuple = ("dropped after handling",)
            else:
                delay = rng.uniform(0.0, 0.05)
                wanted = ()

            def seen() -> bool:
                hits = [r for r in self.hub.requests[first:] if r.method == method and regex.search(r.path)
                        and (not wanted or r.status in wanted)]
                return len(hits) >= nth
            label = f"{how} #{nth}" if how == "lfs_put" else how
            return KillPlan(stage, f"{label} request + {delay:.3f}s", delay, seen)
        raise ValueError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)}")

    # ------------------------------------------------------------------ one trial
    def trial(self, index: int, stage: str | None = None) -> TrialResult:
        """Kill trial ``index`` (aimed at ``stage``, by default the stages in turn), resume it, compare it."""
        self.reference()
        rng = random.Random(f"qk-faults:{self.seed}:{index}")
        stage = stage or STAGES[(self.seed + index) % len(STAGES)]
        repo = f"{USER}/faults-{self.seed}-{index}"
        name = f"trial-{index:02d}"
        if stage == "sniff_chunk":
            work = trial_workdir(self.base / name, repo)
        else:
            work = copy_workdir(self.staged_work, self.base / name)
            set_repo(work, repo)
        root = work / "root"
        plan = self.plan(stage, rng, work, repo)
        second = rng.random() < SECOND_KILL_P
        second_delay = rng.uniform(0.5, SECOND_KILL_WITHIN)
        env = self.env(name)
        attempts: list[Attempt] = []
        problems: list[str] = []
        start = time.monotonic()

        def run(*extra: str, plan: KillPlan | None = None) -> Attempt:
            a = run_snakemake(work, env, work / f"attempt-{len(attempts) + 1}.log", *extra, plan=plan)
            attempts.append(a)
            if a.killed:
                a.temps = temp_files(root)
                a.remote_head = self.hub.head(repo)
                k = sum(1 for x in attempts if x.killed)
                problems.extend(f"after kill {k}: {p}" for p in remote_problems(self.hub, repo))
                problems.extend(f"after kill {k}: {p}" for p in local_problems(root))
            return a

        try:
            last = run(plan=plan)
            if not last.killed:
                problems.append(f"the kill aimed at {stage} ({plan.what}) never fired: the run ended with {last.rc}")
            reruns = 0
            while last.killed or last.rc != 0:
                if reruns >= MAX_RERUNS:
                    problems.append(f"the workflow did not complete within {MAX_RERUNS} reruns")
                    break
                if last.killed:  # a killed run leaves Snakemake's lock behind
                    unlock = run("--unlock")
                    if unlock.rc != 0:
                        problems.append(f"--unlock failed ({unlock.rc}): {unlock.output[-2000:]}")
                        break
                else:
                    problems.append(f"rerun {reruns} failed with exit status {last.rc} (no kill):\n"
                                    f"{_failure(last.output)}\n{_log_tails(root, failed_only=True)}")
                again = None
                if second and reruns == 0:
                    again = KillPlan("rerun", f"rerun + {second_delay:.2f}s", second_delay, lambda: True)
                reruns += 1
                last = run("--rerun-incomplete", plan=again)
            if not last.killed and last.rc == 0:
                problems += self.compare(work, repo)
        except TimeoutError as exc:  # a hung workflow is a finding; the next trial still runs
            problems.append(str(exc))
        result = TrialResult(index, stage, repo, attempts, problems, time.monotonic() - start, resumed_chunks(root))
        self.log(result.describe())
        return result

    # ------------------------------------------------------------------ the comparison
    def compare(self, work: Path, repo: str) -> list[str]:
        """What differs from the reference, or is not a clean final state (empty: nothing)."""
        root = work / "root"
        final = root / "final"
        problems: list[str] = []
        cfg = yaml.safe_load((work / "cfg.yaml").read_text(encoding="utf-8"))
        got = read_configs(root)
        want = self._ref["configs"]
        if sorted(got) != sorted(want):
            problems.append(f"configs differ: missing {sorted(set(want) - set(got))}, "
                            f"extra {sorted(set(got) - set(want))}")
        for name in sorted(set(got) & set(want)):
            if got[name].height != want[name].height:
                problems.append(f"{name}: rows differ ({len(got[name])} rows, the reference has {len(want[name])})")
                continue
            try:  # the chunks ran in other processes than the reference's: vectors to CROSS_PROCESS_RTOL
                assert_same_rows(got[name], want[name], name)
            except AssertionError as exc:
                problems.append(str(exc))
        if card_configs((final / "README.md").read_text(encoding="utf-8")) != self._ref["card"]:
            problems.append("README.md front matter configs differ from the reference's")
        report = verify(root, cfg=cfg)
        if not report.ok:
            problems.append("verify: " + "; ".join(report.problems[:5]))
        if temps := temp_files(root):
            problems.append(f"temporary files left in the data root: {', '.join(temps[:5])}")
        head = self.hub.head(repo)
        if head is None:
            return [*problems, f"nothing was pushed to {repo}"]
        remote = {p: d for p, d in self.hub.files(repo).items() if p != ".gitattributes"}
        local = {rel: p.read_bytes() for rel, p in local_files(final).items()}
        if remote != local:
            differ = sorted(p for p in set(remote) & set(local) if remote[p] != local[p])
            problems.append(f"remote {repo} differs from final/: only remote {sorted(set(remote) - set(local))[:5]}, "
                            f"only local {sorted(set(local) - set(remote))[:5]}, different content {differ[:5]}")
        problems += remote_problems(self.hub, repo)
        pushed = json.loads((root / "push.json").read_text(encoding="utf-8"))
        if pushed.get("revision") != head:
            problems.append(f"push.json records revision {pushed.get('revision')}, the remote head is {head}")
        return problems

    def run_trials(self, trials: int) -> list[TrialResult]:
        self.reference()
        return [self.trial(i) for i in range(trials)]


def _failure(output: str, n: int = 40) -> str:
    """The lines of a snakemake output from its first error on (at most ``n``)."""
    lines = output.splitlines()
    first = next((i for i, ln in enumerate(lines) if "Error" in ln), max(len(lines) - n, 0))
    return "\n".join(lines[first:first + n])


def _log_tails(root: Path, n: int = 1500, failed_only: bool = False) -> str:
    out = []
    for p in sorted((root / "logs").rglob("*.log")):
        text = p.read_text(errors="replace")
        if not failed_only or "error" in text.lower():
            out.append(f"--- {p.relative_to(root)}\n{text[-n:]}")
    return "\n".join(out)


def scan_for(secret: str, *roots: Path) -> tuple[list[str], int]:
    """Files under ``roots`` (or the files themselves) holding ``secret`` or its last 16 characters, and how many
    files were read."""
    needles = {secret.encode(), secret[-16:].encode()}
    hits, count = [], 0
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        for p in paths:
            data = p.read_bytes()
            count += 1
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits, count


def summarize(results: list[TrialResult], wall_s: float) -> dict:
    """Trial count, kills per aimed stage and per rule they landed in, reruns, wall time, and the verdict."""
    aimed = Counter(a.planned for r in results for a in r.kills)
    landed = Counter(rule for r in results for a in r.kills for rule in ({rule_of(o) for o in a.running} or {"none"}))
    return {
        "trials": len(results),
        "trials_per_stage": dict(Counter(r.stage for r in results)),
        "kills": sum(len(r.kills) for r in results),
        "kills_aimed_at": dict(aimed),
        "kills_landed_in": dict(landed),
        "kills_leaving_temp_files": sum(1 for r in results for a in r.kills if a.temps),
        "reruns": sum(r.reruns for r in results),
        "max_reruns": max((r.reruns for r in results), default=0),
        "resumed_chunks": sum(r.resumed_chunks for r in results),
        "wall_s": round(wall_s, 1),
        "all_identical": all(r.ok for r in results),
        "failed": [r.index for r in results if not r.ok],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="number of kill-and-resume trials (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="work under DIR and keep it (default: a temporary directory, removed at the end)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the summary and trials as JSON")
    args = parser.parse_args(argv)
    start = time.monotonic()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qk-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        with FaultHarness(base, seed=args.seed, log=lambda s: print(s, flush=True)) as h:
            results = h.run_trials(args.trials)
        summary = summarize(results, time.monotonic() - start)
        print(json.dumps(summary, indent=2))
        if args.json:
            trials = [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "attempts"},
                       "attempts": [{k: v for k, v in dataclasses.asdict(a).items() if k != "output"}
                                    for a in r.attempts]} for r in results]
            Path(args.json).write_text(json.dumps({"summary": summary, "trials": trials}, indent=2), encoding="utf-8")
        return 0 if summary["all_identical"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
