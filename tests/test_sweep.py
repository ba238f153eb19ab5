"""Sweeps (qk_sniffer/sweep.py): several configs, or one config's ``sweep:`` entries, run as one Snakemake DAG.

The placement and the conflicts are checked on the plan itself; the DAG with dry runs of ``sniff-qk`` and of
plain ``snakemake``; and the whole thing end to end: three tiny checkpoints (two revisions of one model
repository on the fake Hub, one other model) into one data root and two branches, one member's chunk killed
while the others run on, the same command again resuming only that chunk, each member read back from the
Hub with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from qk_sniffer.config import ConfigError
from qk_sniffer.front_matter import read_front_matter
from qk_sniffer.sweep import plan_files

from .support.fakehub import fake_hub_fixture  # noqa: F401  (the fixture fake_hub)
from .support.faults import hub_env
from .support.tiny_data import CORPUS, REPO, TINY_LLAMA
from .support.workflow_runs import SNIFF_QK, workflow_env, write_yaml

HUB_REPO = "tester/qk-sweep"
MODEL_REPO = "tester/tiny-llama"
TIMEOUT = 900


def base(**sections) -> dict:
    cfg = {
        "dataset": {"path": "json", "data_files": str(CORPUS), "max_samples": 24},
        "model": {"name": str(TINY_LLAMA)},
        "tokenizer": {"max_length": 48},
        "inference": {"batch_size": 4},
        "capture": {"min_bucket_size": 8, "layers": [0], "sampler": {"type": "log_uniform", "base_rate": 2.0}},
        "output": {"data_root": "data"},
        "workflow": {"num_chunks": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


# -- the plan ----------------------------------------------------------------------------------------------


def test_members_are_placed_per_branch_and_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = base(model={"config_overrides": {"rms_norm_eps": 1e-5}}, output={"hf_repo_id": HUB_REPO})
    cfg["sweep"] = [
        {"model": {"revision": "step1"}, "output": {"split_name": "step1", "hf_branch": "llama"}},
        {"model": {"revision": "step2", "config_overrides": {"rope_theta": 500.0}}, "capture": {"sampler": {"seed": 5}},
         "output": {"split_name": "step2", "hf_branch": "llama"}},
        {"model": {"name": "other/model"}, "output": {"split_name": "other", "hf_branch": "qwen"}},
    ]
    plan = plan_files([write_yaml(tmp_path / "sweep.yaml", cfg)])
    placed = [(m.split, m.root, m.dataset) for m in plan.members]
    assert placed == [("step1", "data/llama", "data/llama"), ("step2", "data/llama/members/step2", "data/llama"),
                      ("other", "data/qwen", "data/qwen")]
    assert list(plan.datasets) == ["data/llama", "data/qwen"]
    a, b, c = (m.cfg for m in plan.members)
    assert [m.cfg["output"]["data_root"] for m in plan.members] == ["data/llama", "data/llama/members/step2",
                                                                    "data/qwen"]
    # a mapping with keys of its own is merged key by key; a value mapping (config_overrides) is replaced
    assert b["capture"]["sampler"] == {**a["capture"]["sampler"], "seed": 5} and a["capture"]["sampler"]["seed"] == 0
    assert a["model"]["config_overrides"] == {"rms_norm_eps": 1e-5}
    assert b["model"]["config_overrides"] == {"rope_theta": 500.0}
    assert (a["model"]["revision"], b["model"]["revision"], c["model"]["name"]) == ("step1", "step2", "other/model")
    # the two revisions read one dataset with one tokenizer: they share its tokens; the other model does not
    assert [m.shares_tokens for m in plan.members] == [True, True, False]
    assert plan.configs("data/llama") == ["data/llama/.qk-sniffer/config.yaml",
                                          "data/llama/members/step2/.qk-sniffer/config.yaml"]
    assert plan.configs("data/qwen") == "data/qwen/.qk-sniffer/config.yaml"


def test_one_config_is_placed_as_it_always_was(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_files([write_yaml(tmp_path / "one.yaml", base(output={"data_root": "./x/../root", "split_name": "s"}))])
    (m,) = plan.members
    assert (m.root, m.dataset, m.cfg["output"]["data_root"]) == ("x/../root", "x/../root", "./x/../root")


def _entry(split: str | None = None, **output) -> dict:
    return {"output": {**({"split_name": split} if split else {}), **output}}


@pytest.mark.parametrize("entries,message", [
    ([{"model": {"revision": "a"}}, {"model": {"revision": "b"}}],
     r"sweep entry 1 and .*sweep entry 2 both write split '\w+' into data root data; give one of them another "
     r"output\.split_name"),
    ([_entry("s", data_root="d1", hf_repo_id="t/r"), _entry("s", data_root="d2", hf_repo_id="t/r")],
     r"both write split 's' into branch 'main' of Hub repo t/r"),
    ([_entry("a", hf_repo_id="t/r"), _entry("b", hf_repo_id="t/other")],
     r"both use data root data but publish to branch 'main' of Hub repo t/r and branch 'main' of Hub repo "
     r"t/other; a data root mirrors one remote: give one of them its own output\.data_root"),
    ([_entry("a"), _entry("b", hf_repo_id="t/r")], r"publish to no remote and branch 'main' of Hub repo t/r"),
    ([_entry("a", hf_repo_id="t/r", hf_branch="final"), _entry("b", hf_repo_id="t/r")],
     r"output\.hf_branch: branch 'final' would get the folder data/final, which a data root uses for itself"),
    ([_entry("a"), {"modle": {"name": "x"}}], r"sweep entry 2:\n  - unknown key 'modle'\. Did you mean 'model'\?"),
    ([_entry("a"), {"sweep": [_entry("b")]}], r"sweep entry 2: sweep: an entry cannot hold a sweep of its own"),
    ([], r"sweep: \[\] should be non-empty"),
])
def test_conflicting_members_are_refused_with_one_line(tmp_path, monkeypatch, entries, message):
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "sweep.yaml", {**base(), "sweep": entries})
    with pytest.raises(ConfigError, match=message):
        plan_files([path])


def test_the_cli_refuses_a_conflict_before_snakemake_starts(tmp_path):
    a = write_yaml(tmp_path / "a.yaml", base(output={"split_name": "same"}))
    b = write_yaml(tmp_path / "b.yaml", base(model={"revision": "other"}, output={"split_name": "same"}))
    res = subprocess.run([str(SNIFF_QK), "run", "--config", str(a), str(b)], cwd=tmp_path, env=workflow_env(tmp_path),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: output.split_name: config file {a} and config file {b} both write split 'same' "
                           "into data root data")
    assert not (tmp_path / ".snakemake").exists() and not (tmp_path / "data").exists()


def test_the_run_command_counts_the_gpus_once_for_all_members(tmp_path, monkeypatch):
    from qk_sniffer.config import validate_config
    from qk_sniffer.run_command import snakemake_command

    gpu, cpu = validate_config(base()), validate_config(base(inference={"device": "cpu"}, workflow={"num_chunks": 8}))
    paths = [write_yaml(tmp_path / "gpu.yaml", gpu), write_yaml(tmp_path / "cpu.yaml", cpu)]
    monkeypatch.setenv("QK_SNIFFER_GPUS", "0,1")
    cmd = snakemake_command(paths, [gpu, cpu], workdir=tmp_path)
    assert cmd[cmd.index("--configfile") + 1:cmd.index("--directory")] == [str(p.resolve()) for p in paths]
    assert cmd[cmd.index("--resources") + 1] == "gpu=2"  # the GPUs found; the CPU member's chunks hold none
    monkeypatch.setenv("QK_SNIFFER_GPUS", "")  # no GPU: nothing held back (2 + 8 chunks)
    assert snakemake_command(paths, [gpu, cpu], workdir=tmp_path)[cmd.index("--resources") + 1] == "gpu=10"


# -- the DAG -----------------------------------------------------------------------------------------------


def job_counts(out: str) -> dict[str, int]:
    table = out.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_several_configs_and_a_glob_are_one_dag(tmp_path):
    cfgs = tmp_path / "cfgs"
    write_yaml(cfgs / "a.yaml", {**base(), "sweep": [_entry("a1"), _entry("a2")]})
    write_yaml(cfgs / "b.yaml", base(output={"data_root": "other", "split_name": "b"}, workflow={"num_chunks": 3}))
    env = workflow_env(tmp_path)
    # a quoted glob, expanded by sniff-qk
    res = subprocess.run([str(SNIFF_QK), "run", "--config", "cfgs/*.yaml", "-n", "--cores", "2"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    counts = job_counts(out)
    assert counts["sniff_chunk"] == 2 + 2 + 3 and counts["merge_staging"] == counts["push_hub"] == 2, out
    chunks = set(re.findall(r"wildcards: root=([\w/]+), chunk=(\d+)", out))
    assert chunks == {("data", "0"), ("data", "1"), ("data/members/a2", "0"), ("data/members/a2", "1"),
                      ("other", "0"), ("other", "1"), ("other", "2")}
    # the second member's final/ is the data root's; its effective config names its own root
    assert os.readlink(tmp_path / "data/members/a2/final") == "../../final"
    assert yaml.safe_load((tmp_path / "data/members/a2/.qk-sniffer/config.yaml").read_text())["output"] == {
        **yaml.safe_load((tmp_path / "data/.qk-sniffer/config.yaml").read_text())["output"],
        "data_root": "data/members/a2", "split_name": "a2"}
    # plain snakemake: one --configfile per member file, the same DAG
    plain = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"),
                            "--configfile", "cfgs/a.yaml", "cfgs/b.yaml", "--cores", "2", "-n"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert job_counts(plain.stdout + plain.stderr) == counts


# -- end to end --------------------------------------------------------------------------------------------


def publish_model_revisions(hub) -> None:
    """``tester/tiny-llama`` on the fake Hub: ``step1`` (= main) the tiny Llama, ``step2`` its weights scaled."""
    from safetensors.numpy import load_file, save

    files = {p.name: p.read_bytes() for p in TINY_LLAMA.iterdir() if p.is_file()}
    hub.create_repo(MODEL_REPO, repo_type="model")
    step1 = hub.commit(MODEL_REPO, files, repo_type="model", message="step 1")
    hub.set_branch(MODEL_REPO, "step1", step1, repo_type="model")
    hub.set_branch(MODEL_REPO, "step2", step1, repo_type="model")
    weights = {k: (v * 1.25 if v.ndim == 2 else v) for k, v in load_file(TINY_LLAMA / "model.safetensors").items()}
    hub.commit(MODEL_REPO, {"model.safetensors": save(weights, metadata={"format": "pt"})}, branch="step2",
               repo_type="model", message="step 2")


def chunk_process(config_arg: str) -> int | None:
    """The pid of the ``python -m qk_sniffer sniff-chunk --config CONFIG_ARG`` process, if it runs."""
    for d in Path("/proc").iterdir():
        try:
            argv = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except (OSError, ValueError):
            continue
        if "sniff-chunk" in argv and config_arg in argv and "qk_sniffer" in argv:
            return int(d.name)
    return None


def segments(journal: Path) -> int:
    try:
        return len(json.loads(journal.read_text())["segments"])
    except (OSError, ValueError, KeyError):
        return 0


def logs(root: Path) -> dict[int, str]:
    return {int(p.stem.split("-")[1]): p.read_text() for p in sorted(root.glob("logs/sniff_chunk/chunk-*.log"))}


@pytest.mark.slow
def test_a_sweep_of_three_checkpoints_into_two_branches(fake_hub, tiny_models, tmp_path):
    publish_model_revisions(fake_hub)
    work = tmp_path / "work"
    output = {"data_root": "data", "hf_repo_id": HUB_REPO}
    write_yaml(work / "cfgs/llama.yaml", {**base(model={"name": MODEL_REPO}, output=output), "sweep": [
        {"model": {"revision": "step1"}, "output": {"split_name": "step1", "hf_branch": "llama"}},
        {"model": {"revision": "step2"}, "output": {"split_name": "step2", "hf_branch": "llama"}},
    ]})
    # the other model: one chunk of one example per batch with a checkpoint after each, killed part-way
    write_yaml(work / "cfgs/qwen.yaml", base(
        model={"name": str(tiny_models("qwen3"))}, dataset={"max_samples": 120},
        inference={"batch_size": 1, "checkpoint_every_s": 1e-9}, workflow={"num_chunks": 1},
        output={**output, "split_name": "qwen3", "hf_branch": "qwen"}))
    env = hub_env(fake_hub, fake_hub.token, tmp_path / "hf-home", tmp_path / "gpu-locks")
    cmd = [str(SNIFF_QK), "run", "--config", "cfgs/llama.yaml", "cfgs/qwen.yaml", "--cores", "2"]
    llama, step2, qwen = work / "data/llama", work / "data/llama/members/step2", work / "data/qwen"

    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT
            while segments(qwen / "staging/chunk-0/progress.json") < 3 or not (pid := chunk_process(
                    "data/qwen/.qk-sniffer/config.yaml")):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-5000:]
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            first_rc = proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    first = (tmp_path / "first.log").read_text()
    assert first_rc == 1 and not (qwen / "staging/chunk-0/manifest.json").exists(), first[-5000:]
    # the failed member did not stop the others: both revisions were captured, merged and pushed
    done = [r / f"staging/chunk-{i}/manifest.json" for r in (llama, step2) for i in (0, 1)]
    assert all(p.is_file() for p in done) and json.loads((llama / "push.json").read_text())["pushed"], first[-5000:]
    assert "qwen" not in fake_hub.repos[("dataset", HUB_REPO)].branches
    kept = {p: p.stat().st_mtime_ns for p in [*done, *sorted((llama / "final/data").rglob("*.parquet"))]}
    card = (llama / "final/README.md").read_bytes()
    llama_head = fake_hub.head(HUB_REPO, "llama")

    # the same command again: only the killed chunk runs, from its last checkpoint
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert job_counts(out)["sniff_chunk"] == 1 and "wildcards: root=data/qwen, chunk=0" in out, out[-5000:]
    # the revisions' chunks, data files and card are left as they were, and nothing new is pushed to their branch
    # (their merge, card, verify and push jobs run again and find nothing to do: push rewrites
    # final/.snapshot.json, an input of merge_staging, as in any run with a remote)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert (llama / "final/README.md").read_bytes() == card and fake_hub.head(HUB_REPO, "llama") == llama_head
    assert "resuming after" in logs(qwen)[0]
    assert json.loads((qwen / "staging/chunk-0/manifest.json").read_text())["resumed"]["segments"] >= 3

    # every member loads from its branch of the Hub, with the rows of its own split
    loaded = {}
    for split, branch in (("step1", "llama"), ("step2", "llama"), ("qwen3", "qwen")):
        ds = datasets.load_dataset(HUB_REPO, "l00h00q", split=split, revision=branch,
                                   cache_dir=str(tmp_path / "hf-cache"))
        local = work / f"data/{branch}/final/data/{split}/l00h00q/data.parquet"
        assert ds.num_rows == pq.read_metadata(local).num_rows > 0, split
        loaded[split] = ds.sort(["example_id", "position"])
    # the two revisions were honoured: the same tokens' queries differ (step 2's weights are scaled)
    assert loaded["step1"]["example_id"] == loaded["step2"]["example_id"]
    assert not np.allclose(np.array(loaded["step1"]["vector"]), np.array(loaded["step2"]["vector"]), rtol=1e-3)

    # each branch's card is its members': their splits, models and revisions
    cards = {}
    for branch in ("llama", "qwen"):
        card = work / f"data/{branch}/final/README.md"
        assert fake_hub.files(HUB_REPO, branch)["README.md"] == card.read_bytes()
        cards[branch] = read_front_matter(card)[0]["qk_sniffer"]["splits"]
    assert sorted(cards["llama"]) == ["step1", "step2"] and sorted(cards["qwen"]) == ["qwen3"]
    assert [cards["llama"][s]["model"]["revision"] for s in ("step1", "step2")] == ["step1", "step2"]
    assert cards["llama"]["step1"]["model"]["name"] == MODEL_REPO
    assert cards["qwen"]["qwen3"]["model"]["name"] == str(tiny_models("qwen3"))

    # the two revisions read one dataset with one tokenizer: each shard was tokenized once, then shared
    for i in (0, 1):
        pair = [logs(llama)[i], logs(step2)[i]]
        assert sum("tokenized" in t and "shared them" in t for t in pair) == 1, pair
        assert sum("read from the shared cache" in t for t in pair) == 1, pair
    assert not (work / ".qk-sniffer/tokens").exists()  # removed once every member had its chunks
