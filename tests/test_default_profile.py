"""Plain ``snakemake`` from the repository root runs with the project's defaults, as ``sniff-qk`` does.

Snakemake applies a workflow profile found at ``profiles/default`` of the working directory or of the
Snakefile's folder; the repository's ``profiles/default`` links to ``workflow/profiles/default``, the profile
``sniff-qk run`` names. These tests run exactly ``snakemake --cores 2 --resources gpu=2`` from the repository
root (with ``--directory`` and ``--configfile`` so nothing lands in the checkout) and check each default by
what it does: a failed job's log is shown, a failed chunk does not stop the other, and the jobs a killed run
left incomplete are redone without asking.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qk_sniffer.run_command import DEFAULT_PROFILE

from .support.tiny_data import REPO, TINY_LLAMA
from .support.workflow_runs import make_workdir, workflow_env

pytestmark = pytest.mark.slow

SNAKEMAKE = Path(sys.executable).parent / "snakemake"
TIMEOUT = 600
# each run: 12 examples of the demo corpus in 2 chunks, layer 0 only
WORKDIR_SECTIONS = {"dataset": {"max_samples": 12}, "tokenizer": {"max_length": 32}, "capture": {"layers": [0]},
                    "workflow": {"num_chunks": 2}}


def plain(work: Path, *extra: str, **kw) -> list[str]:
    """The command users type at the repository root (plus where the run's files go)."""
    return [str(SNAKEMAKE), "--cores", "2", "--resources", "gpu=2", "--directory", str(work),
            "--configfile", str(work / "cfg.yaml"), *extra]


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=workflow_env(tmp), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_the_repository_profile_is_the_one_sniff_qk_uses():
    assert (REPO / "profiles" / "default").resolve() == DEFAULT_PROFILE.resolve()
    keys = yaml.safe_load((DEFAULT_PROFILE / "config.yaml").read_text())
    # it also applies under --profile slurm (a workflow profile overrides a profile key by key): nothing in it
    # may change what the SLURM profile sets
    slurm = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert all(slurm.get(k, v) == v for k, v in keys.items()), keys
    assert not {"cores", "resources", "latency-wait", "executor"} & set(keys)


def test_a_failed_job_shows_its_log_and_does_not_stop_the_other(tmp_path):
    # a failure only the jobs meet (the preflight reads the model's config, not its weights): damaged weights
    model = tmp_path / "model"
    shutil.copytree(TINY_LLAMA, model)
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS, model={"name": str(model)})
    res = run(plain(work), tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert f"Using workflow specific profile {REPO / 'profiles' / 'default'}" in out or \
        "workflow specific profile profiles/default" in out, out[:2000]
    # show-failed-logs: the job's own log, with the one line that says what went wrong, in snakemake's output
    log = (work / "root/logs/sniff_chunk/chunk-0.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.name: the weights of" in errors[0] and "download it again" in errors[0], log
    assert errors[0] in out and "Traceback" not in log, out[-4000:]
    # keep-going: the second chunk ran although the first failed (one at a time: 2 threads each, --cores 2)
    assert sorted(p.name for p in (work / "root/logs/sniff_chunk").glob("*.log")) == ["chunk-0.log", "chunk-1.log"]


def test_a_killed_run_is_redone_without_asking(tmp_path):
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS)
    first = run(plain(work), tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    log = work / "root/logs/render_readme.log"
    log.unlink()
    env = {**os.environ, "QK_SNIFFER_GPUS": "", "QK_SNIFFER_GPU_LOCK_DIR": str(tmp_path / "gpu-locks")}
    proc = subprocess.Popen(plain(work, "--forcerun", "render_readme"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not log.exists():  # the job started: Snakemake marked the card, which exists, incomplete
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert run(plain(work, "--unlock"), tmp_path).returncode == 0
    # without the profile Snakemake refuses to go on
    refused = run(plain(work, "--workflow-profile", "none"), tmp_path)
    assert refused.returncode != 0 and "incomplete" in (refused.stdout + refused.stderr).lower()
    # the plain command redoes the incomplete job (rerun-incomplete) and what follows from it
    res = run(plain(work), tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "rule render_readme" in out and "sniff_chunk" not in out, out[-4000:]  # redone as if forced, alone
