"""The trials: a reference run, then runs killed by plan and resumed, each compared with the reference."""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from qk_sniffer.remote import local_files
from qk_sniffer.verify import verify

from ..fakehub import FakeHub
from ..rows import assert_same_rows
from ..workflow_runs import copy_workdir
from .checks import (
    card_configs,
    final_has_temp,
    local_problems,
    read_configs,
    remote_problems,
    resumed_chunks,
    rule_of,
    temp_files,
)
from .runs import Attempt, KillPlan, Timings, run_snakemake, watch_files
from .settings import (
    MAX_RERUNS,
    NUM_CHUNKS,
    PUSH_TRIGGERS,
    SECOND_KILL_P,
    SECOND_KILL_WITHIN,
    STAGES,
    TARGETS,
    USER,
)
from .workdirs import hub_env, set_repo, trial_workdir


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
                                plan=KillPlan("none", "never", 0.0, watch_files(root, seen)))
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
                                lambda: log.exists() and (final_has_temp(root) or target.exists()))
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
