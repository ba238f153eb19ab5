"""The shipped SLURM profile on a real single-node SLURM cluster (tests/support/slurm_cluster.py, fixture ``slurm``).

The workflow runs with ``--profile workflow/profiles/slurm`` followed by a test overlay profile
generated from it, which changes only what this machine needs: the partition (``main``), no
account, at most 2 CPU threads and 1.5 GB per chunk (the node has 2 CPUs), fast status polling,
and keeping the plugin's logs of successful jobs. Everything else (executor, squeue status mode,
requeue, retries, rerun-incomplete, the GPU request) comes from the shipped profile.

The test config sets ``inference.device: cpu``, so the rule's own ``gpu`` resource is 0 and no
GPU is requested; the node has no GRES. A second test checks the other side: with a GPU config
the shipped profile does ask SLURM for GPUs, and a node without them refuses the job at
submission instead of running it on the CPU.

Needs root and ``apt-get install -y slurm-wlm munge``; skipped otherwise, unless
QK_SNIFFER_REQUIRE_SLURM=1 (as in CI), which turns the skip into a failure.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.front_matter import read_front_matter

from .support.tiny_data import REPO
from .support.workflow_runs import final_files, make_workdir, snakemake_cmd

pytestmark = pytest.mark.slow

PROFILE = REPO / "workflow" / "profiles" / "slurm"
SPLIT = "tiny"
NUM_CHUNKS = 2
# each run: 24 examples of the demo corpus in NUM_CHUNKS chunks
WORKDIR_SECTIONS = {"dataset": {"max_samples": 24}, "tokenizer": {"max_length": 48}, "workflow": {"num_chunks": NUM_CHUNKS}}
RUN_TIMEOUT = 600
SUBMITTED_RE = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")


def overlay_profile(path: Path, partition: str, **sniff_resources) -> Path:
    """A profile to give after the shipped one: the shipped values, with what this node needs changed.

    A later profile replaces whole keys, so the mappings it changes start as copies of the shipped ones.
    """
    shipped = yaml.safe_load((PROFILE / "config.yaml").read_text(encoding="utf-8"))
    default_resources = {**shipped["default-resources"], "slurm_partition": partition}
    set_resources = copy.deepcopy(shipped["set-resources"])
    set_resources["sniff_chunk"].update({"mem_mb": 1500, "runtime": 15, **sniff_resources})
    overlay = {
        "default-resources": default_resources,
        "set-resources": set_resources,
        "set-threads": {"sniff_chunk": 2},
        # the test cluster has no accounts (plugin 2.8 still tries to guess one, fails, and submits without)
        "slurm-no-account": True,
        "slurm-init-seconds-before-status-checks": 2,
        "slurm-keep-successful-logs": True,
        "latency-wait": 5,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False), encoding="utf-8")
    return path


def run_env(base: dict, tmp: Path) -> dict:
    """``base`` (the cluster's environment, or this process's for the local run) without a job context of its own."""
    env = {k: v for k, v in base.items() if not (k.startswith("SLURM_") and k != "SLURM_CONF")}
    env.update({"QK_SNIFFER_GPUS": "", "QK_SNIFFER_GPU_LOCK_DIR": str(tmp / "gpu-locks")})
    env.pop("QK_SNIFFER_DEBUG", None)
    return env


def describe(res: subprocess.CompletedProcess, work: Path, cluster=None) -> str:
    paths = sorted(work.glob("root/logs/**/*.log")) + sorted(work.glob(".snakemake/slurm_logs/**/*.log"))
    logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in paths)
    return (f"snakemake exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-8000:]}\n"
            f"{logs}\n{cluster.logs() if cluster is not None else ''}")


def final_tables(work: Path) -> dict[str, object]:
    return {name: pq.read_table(p) for name, p in final_files(work / "root", SPLIT).items()}


def card_metadata(card: dict) -> dict:
    """The card's per-split run metadata, less its timestamps."""
    splits = copy.deepcopy(card["qk_sniffer"]["splits"])
    for meta in splits.values():
        for key in [k for k in meta if k.endswith("_at")]:
            del meta[key]
    return splits


def test_workflow_on_slurm_matches_local_run(slurm, tmp_path):
    cpu = {"inference": {"batch_size": 8, "device": "cpu"}}
    on_slurm = make_workdir(tmp_path / "slurm", WORKDIR_SECTIONS, **cpu)
    local = make_workdir(tmp_path / "local", WORKDIR_SECTIONS, **cpu)
    overlay = overlay_profile(tmp_path / "overlay-profile", slurm.partition)

    # the local reference runs at the same time: the SLURM run mostly waits for status checks
    started = time.monotonic()
    local_proc = subprocess.Popen(snakemake_cmd(local), cwd=local, env=run_env(os.environ, tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        res = subprocess.run(snakemake_cmd(on_slurm, "--profile", str(PROFILE), "--profile", str(overlay), cores=None),
                             cwd=on_slurm, env=run_env(slurm.env, tmp_path), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT, check=False)
        slurm_s = time.monotonic() - started
        out, err = local_proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if local_proc.poll() is None:
            local_proc.kill()
            local_proc.wait()
    local_res = subprocess.CompletedProcess(local_proc.args, local_proc.returncode, out, err)
    assert local_res.returncode == 0, describe(local_res, local)
    assert res.returncode == 0, describe(res, on_slurm, slurm)
    print(f"workflow on SLURM: {slurm_s:.0f} s")

    # -- the chunks went through sbatch, and nothing else did (the other rules are localrules)
    text = res.stdout + res.stderr
    submitted = SUBMITTED_RE.findall(text)
    assert len(submitted) == NUM_CHUNKS, describe(res, on_slurm, slurm)
    chunks_seen = []
    for _, job_id, log in submitted:
        log_path = Path(log)
        assert log_path.is_relative_to(on_slurm / ".snakemake" / "slurm_logs" / "rule_sniff_chunk"), log
        assert log_path.name == f"{job_id}.log" and log_path.is_file(), log
        job = slurm.job(job_id)
        assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Partition"] == slurm.partition and job["WorkDir"] == str(on_slurm), job
        assert job["NumCPUs"] == "2", job  # the overlay's threads, within the node
        job_log = log_path.read_text(encoding="utf-8")
        # the batch script's Snakemake hands the rule to `srun`, where a second one runs it
        assert "localrule sniff_chunk:" in job_log, job_log
        found = set(re.findall(r"wildcards: root=[^,\n]+, chunk=(\d+)", job_log))
        assert len(found) == 1, job_log
        chunks_seen.append(int(found.pop()))
    assert sorted(chunks_seen) == list(range(NUM_CHUNKS))
    # every SLURM job of the run is one of those: no local rule was submitted
    queue = slurm.command("squeue", "--states=all", "--noheader", "--format=%i|%j").stdout.split()
    run_name = {line.split("|")[1] for line in queue if line.split("|")[0] in {j for _, j, _ in submitted}}
    assert len(run_name) == 1
    assert sorted(line.split("|")[0] for line in queue if line.split("|")[1] in run_name) == \
        sorted(j for _, j, _ in submitted)

    # -- each chunk ran inside its SLURM job
    job_ids = {c: j for c, (_, j, _) in zip(chunks_seen, submitted)}
    for chunk in range(NUM_CHUNKS):
        manifest = json.loads((on_slurm / "root" / "staging" / f"chunk-{chunk}" / "manifest.json").read_text())
        local_manifest = json.loads((local / "root" / "staging" / f"chunk-{chunk}" / "manifest.json").read_text())
        assert manifest["rows"] == local_manifest["rows"]
        assert manifest["example_range"] == local_manifest["example_range"]
        if "slurm_job_id" in manifest:
            assert str(manifest["slurm_job_id"]) == job_ids[chunk]
            assert local_manifest["slurm_job_id"] in (None, "")

    # -- the same dataset as the local run: every file's rows, and the card's configs
    got, want = final_tables(on_slurm), final_tables(local)
    assert sorted(got) == sorted(want) and len(want) > 0
    for name, table in want.items():
        assert got[name].num_rows > 0
        assert got[name].schema == table.schema, name
        assert got[name].equals(table), f"{name}: rows differ between the SLURM run and the local run"
    got_card, _ = read_front_matter(on_slurm / "root" / "final" / "README.md")
    want_card, _ = read_front_matter(local / "root" / "final" / "README.md")
    assert got_card["configs"] == want_card["configs"]
    assert card_metadata(got_card) == card_metadata(want_card)
    assert json.loads((on_slurm / "root" / "push.json").read_text())["pushed"] is False

    # -- one lost chunk reruns alone when its manifest is named as the target
    manifest = on_slurm / "root" / "staging" / "chunk-1" / "manifest.json"
    other = on_slurm / "root" / "staging" / "chunk-0" / "manifest.json"
    before, other_mtime = json.loads(manifest.read_text()), other.stat().st_mtime_ns
    manifest.unlink()
    res = subprocess.run(snakemake_cmd(on_slurm, "--profile", str(PROFILE), "--profile", str(overlay),
                                       "root/staging/chunk-1/manifest.json", cores=None),
                         cwd=on_slurm, env=run_env(slurm.env, tmp_path), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, check=False)
    assert res.returncode == 0, describe(res, on_slurm, slurm)
    again = SUBMITTED_RE.findall(res.stdout + res.stderr)
    assert len(again) == 1 and f"/rule_sniff_chunk/root_1/{again[0][1]}.log" in again[0][2], again
    assert again[0][1] not in job_ids.values()
    assert slurm.job(again[0][1])["JobState"] == "COMPLETED"
    after = json.loads(manifest.read_text())
    assert after["rows"] == before["rows"] and after["example_range"] == before["example_range"]
    assert other.stat().st_mtime_ns == other_mtime  # chunk 0 was left alone


def test_gpu_chunks_request_gpus_from_slurm(slurm, tmp_path):
    """A GPU config: the shipped profile turns the rule's gpu resource into sbatch --gpus (with the
    model when gpu_model is set) and --cpus-per-gpu; this node has no GPUs, so SLURM refuses the job."""
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS, inference={"device": "auto"},
                        workflow={"num_chunks": 1, "gpus_per_chunk": 2})
    overlay = overlay_profile(tmp_path / "overlay-profile", slurm.partition, gpu_model="testgpu")
    before = slurm.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split()
    res = subprocess.run(snakemake_cmd(work, "--profile", str(PROFILE), "--profile", str(overlay), "--retries", "0",
                                       cores=None),
                         cwd=work, env=run_env(slurm.env, tmp_path), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, check=False)
    text = res.stdout + res.stderr
    assert res.returncode != 0, describe(res, work, slurm)
    assert "SLURM sbatch failed" in text, describe(res, work, slurm)
    assert "Invalid generic resource" in text, describe(res, work, slurm)
    calls = re.findall(r"sbatch call:\s*\n\s*(sbatch .*)", text)
    assert calls, describe(res, work, slurm)
    call = calls[0]
    assert "--gpus=testgpu:2" in call and "--cpus-per-gpu=4" in call and "--requeue" in call, call
    assert f"-p {slurm.partition}" in call and "--mem 1500" in call and "-t 15" in call, call
    # nothing reached the queue, and no chunk was written
    after = slurm.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split()
    assert after == before
    assert not list(work.glob("root/staging/chunk-*/manifest.json"))


def test_a_bad_column_fails_in_the_preflight_before_any_sbatch(slurm, tmp_path):
    """A config naming a column the dataset lacks stops while Snakemake builds the DAG, in one line of its own
    output, before anything is submitted."""
    work = make_workdir(tmp_path / "work", WORKDIR_SECTIONS, dataset={"max_samples": 24, "text_column": "body"},
                        inference={"device": "cpu"})
    overlay = overlay_profile(tmp_path / "overlay-profile", slurm.partition)
    before = slurm.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split()
    started = time.monotonic()
    res = subprocess.run(snakemake_cmd(work, "--profile", str(PROFILE), "--profile", str(overlay), cores=None),
                         cwd=work, env=run_env(slurm.env, tmp_path), capture_output=True, text=True,
                         timeout=RUN_TIMEOUT, check=False)
    took = time.monotonic() - started
    text = res.stdout + res.stderr
    assert res.returncode != 0, describe(res, work, slurm)
    lines = [line for line in text.splitlines() if "dataset.text_column" in line]
    assert len(lines) == 1 and lines[0].startswith("preflight: dataset.text_column: column 'body'"), text
    assert "set dataset.text_column to one of them" in lines[0] and "Traceback" not in text, text
    assert "sbatch" not in text and not SUBMITTED_RE.search(text), text
    assert slurm.command("squeue", "--states=all", "--noheader", "--format=%i").stdout.split() == before
    assert not (work / "root" / "staging").exists()
    print(f"preflight refusal on the SLURM profile: {took:.1f} s")
