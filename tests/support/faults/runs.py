"""Running snakemake in its own process group and killing it by plan; the reference run's timings and watchers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..workflow_runs import snakemake_cmd
from .checks import (
    final_has_temp,
    incomplete_jobs,
)
from .settings import (
    NUM_CHUNKS,
    POLL,
    RUN_TIMEOUT,
    TARGETS,
)


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


def watch_files(root: Path, seen: dict[str, float]) -> Callable[[], bool]:
    """A trigger that never fires and records when each file of :data:`WATCHED` first appears."""
    start = time.monotonic()

    def poll() -> bool:
        now = time.monotonic() - start
        for rel in WATCHED:
            if rel not in seen and (root / rel).exists():
                seen[rel] = now
        if "merge:first-temp" not in seen and "logs/merge_staging.log" in seen and final_has_temp(root):
            seen["merge:first-temp"] = now
        return False

    return poll
