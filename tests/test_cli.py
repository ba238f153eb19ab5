"""The ``sniff-qk`` command: help, config errors, a real chunk through ``python -m qk_sniffer``,
the snakemake command ``run`` builds, and the effective config the workflow hands to its rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from qk_sniffer.cli import main
from qk_sniffer.config import chunk_fingerprint, load_config
from qk_sniffer.effective_config import effective_config_path, write_effective_config
from qk_sniffer.run_command import DEFAULT_PROFILE, SNAKEFILE, snakemake_command

from .support.tiny_data import REPO, base_config
from .support.workflow_runs import SNIFF_QK, workflow_env, write_yaml


@pytest.fixture
def bad_config(tmp_path) -> Path:
    cfg = base_config(tmp_path / "root")
    cfg["dataset"]["max_sample"] = cfg["dataset"].pop("max_samples")
    return write_yaml(tmp_path / "bad.yaml", cfg)


def test_help_names_every_stage_and_its_target():
    res = subprocess.run([str(SNIFF_QK), "--help"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    for command, target in [("run", "push.json"), ("pull", "final/.snapshot.json"),
                            ("sniff-chunk", "staging/chunk-<i>/manifest.json"), ("merge", "final/.merged.json"),
                            ("render-readme", "final/README.md"), ("push", "push.json")]:
        line = next((ln for ln in res.stdout.splitlines() if ln.strip().startswith(command + " ")), None)
        assert line is not None and target in line, (command, res.stdout)


@pytest.mark.parametrize("command,target", [("sniff-chunk", "staging/chunk-<i>/manifest.json"),
                                            ("merge", "final/.merged.json"), ("render-readme", "final/README.md"),
                                            ("pull", "final/.snapshot.json"), ("push", "push.json")])
def test_stage_help_says_what_it_produces(command, target, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"Produces: <data_root>/{target}" in out and "--config" in out


def test_run_help_explains_passthrough(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--resources gpu=2" in out and "--executor slurm" in out


def test_unknown_key_exits_2_with_did_you_mean(bad_config, tmp_path):
    res = subprocess.run([str(SNIFF_QK), "sniff-chunk", "--config", str(bad_config), "--chunk", "0"],
                         capture_output=True, text=True, env=workflow_env(tmp_path), check=False)
    assert res.returncode == 2
    assert "error: invalid config file" in res.stderr
    assert "unknown key 'dataset.max_sample'. Did you mean 'max_samples'?" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "root").exists()


def test_no_subcommand_is_run_and_validates_first(bad_config, capsys):
    # `sniff-qk --config X` is `run`: the config is checked before snakemake starts
    assert main(["--config", str(bad_config), "-n"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'max_samples'?" in err and "Traceback" not in err


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["sniff_chunk", "--config", "x.yaml"]) == 2
    assert "unknown command 'sniff_chunk'. Did you mean 'sniff-chunk'?" in capsys.readouterr().err


def test_missing_config_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["merge", "--config", str(missing)]) == 2
    assert f"config file {missing} does not exist" in capsys.readouterr().err


def test_debug_shows_the_traceback(bad_config, monkeypatch, capsys):
    monkeypatch.setenv("QK_SNIFFER_DEBUG", "1")
    assert main(["merge", "--config", str(bad_config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and "error: invalid config file" in err


def test_chunk_index_out_of_range(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "cfg.yaml", base_config(tmp_path / "root", workflow={"num_chunks": 2}))
    assert main(["sniff-chunk", "--config", str(cfg), "--chunk", "2"]) == 2
    assert "--chunk: 2 is not a chunk of " in (err := capsys.readouterr().err) and "its examples are 2 chunk(s), 0..1" in err


def test_runtime_error_exits_1_without_traceback(tmp_path, capsys):
    # a chunk whose fingerprint no longer matches the final split's chunks: merge refuses (MergeError)
    root = tmp_path / "root"
    cfg = base_config(root)
    stale = root / "staging" / "chunk-0"
    stale.mkdir(parents=True)
    (stale / "manifest.json").write_text(json.dumps({"chunk": 0, "num_chunks": 1, "split": "tiny",
                                                     "config_fingerprint": "0" * 16, "rows": {}, "files": {}}))
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    assert main(["merge", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err and str(stale) in err


def test_python_m_sniff_chunk_writes_a_complete_chunk(tmp_path):
    root = tmp_path / "root"
    cfg = base_config(root, dataset={"max_samples": 10}, tokenizer={"max_length": 48}, workflow={"num_chunks": 2})
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    env = workflow_env(tmp_path, QK_SNIFFER_GPUS="7")  # a pretend GPU: the lease must hand it out
    res = subprocess.run([sys.executable, "-m", "qk_sniffer", "sniff-chunk", "--config", str(path), "--chunk", "1",
                          "--threads", "1"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    assert "leased GPU(s) 7" in res.stderr
    assert (tmp_path / "gpu-locks" / "gpu-7.lock").is_file()

    chunk = root / "staging" / "chunk-1"
    manifest = json.loads((chunk / "manifest.json").read_text())
    assert manifest["chunk"] == 1 and manifest["chunk_size"] == 5
    assert manifest["example_range"] == [5, 10]  # planned here: the examples divided into workflow.num_chunks
    assert manifest["config_fingerprint"] == chunk_fingerprint(cfg)
    assert manifest["device"] == "cpu"
    assert len(manifest["rows"]) == 4 * (4 + 2)  # every layer: 4 query heads and 2 key heads
    assert sum(manifest["rows"].values()) > 0
    for name, rel in manifest["files"].items():
        meta = pq.read_metadata(chunk / rel)
        assert meta.num_rows == manifest["rows"][name] > 0
    assert {n for n, r in manifest["rows"].items() if r} == set(manifest["files"])
    leftovers = [p for p in chunk.rglob("*") if p.is_file() and p.suffix not in (".json", ".parquet")]
    assert leftovers == []


def test_fingerprint_mismatch_is_refused_before_any_work(tmp_path):
    from qk_sniffer.chunk.plan import ChunkSpec

    root = tmp_path / "root"
    path = write_yaml(tmp_path / "cfg.yaml", base_config(root))
    plan = tmp_path / "chunk-0.json"  # the plan the workflow wrote for another config
    plan.write_text(ChunkSpec(chunk=0, start=0, stop=4, chunk_size=4, fingerprint="0123456789abcdef").to_json())
    res = subprocess.run([sys.executable, "-m", "qk_sniffer", "sniff-chunk", "--config", str(path), "--chunk", "0",
                          "--plan", str(plan)],
                         capture_output=True, text=True, env=workflow_env(tmp_path), cwd=tmp_path, check=False)
    assert res.returncode == 2
    assert "fingerprint 0123456789abcdef) does not match the config" in res.stderr
    assert not (root / "staging").exists()


def test_run_builds_the_snakemake_command(tmp_path, monkeypatch):
    cfg = base_config(tmp_path / "root", workflow={"num_chunks": 3})
    cfg_path = write_yaml(tmp_path / "cfg.yaml", cfg)
    monkeypatch.setenv("QK_SNIFFER_GPUS", "0,1,2")
    cmd = snakemake_command(cfg_path, cfg, cores="4", workdir=tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "snakemake"]
    assert cmd[cmd.index("-s") + 1] == str(SNAKEFILE)
    assert cmd[cmd.index("--configfile") + 1] == str(cfg_path.resolve())
    assert cmd[cmd.index("--directory") + 1] == str(tmp_path)
    assert cmd[cmd.index("--cores") + 1] == "4"
    assert cmd[cmd.index("--workflow-profile") + 1] == str(DEFAULT_PROFILE)
    assert cmd[cmd.index("--resources") + 1] == "gpu=3"  # the GPUs this machine shows

    extra = ["--resources", "gpu=2", "-n", "--forcerun", "pull_hub"]
    cmd = snakemake_command(cfg_path, cfg, extra=extra, workdir=tmp_path)
    assert cmd[-len(extra):] == extra and cmd.count("--resources") == 1

    cmd = snakemake_command(cfg_path, cfg, extra=["--profile", "workflow/profiles/slurm"], workdir=tmp_path)
    assert "--workflow-profile" not in cmd and "--resources" not in cmd
    # under a cluster executor --cores would cap every submitted job's threads: left out unless asked for
    assert "--cores" not in cmd
    assert "--cores" not in snakemake_command(cfg_path, cfg, extra=["--executor", "slurm"], workdir=tmp_path)
    cmd = snakemake_command(cfg_path, cfg, cores="8", extra=["--executor=slurm"], workdir=tmp_path)
    assert cmd[cmd.index("--cores") + 1] == "8"
    local = snakemake_command(cfg_path, cfg, workdir=tmp_path)
    assert local[local.index("--cores") + 1] == "all"
    # a profile shipped with the workflow can be named from any working directory
    cmd = snakemake_command(cfg_path, cfg, extra=["--profile=default"], workdir=tmp_path)
    assert cmd[-1] == f"--profile={DEFAULT_PROFILE}"

    monkeypatch.setenv("QK_SNIFFER_GPUS", "")  # no GPU: the gpu count must not hold chunks back
    cmd = snakemake_command(cfg_path, cfg, workdir=tmp_path)
    assert cmd[cmd.index("--resources") + 1] == "gpu=3"


def test_run_dry_run_passes_arguments_through(tmp_path):
    cfg = base_config(Path("root"), workflow={"num_chunks": 2})
    path = write_yaml(tmp_path / "cfg.yaml", cfg)
    res = subprocess.run([str(SNIFF_QK), "--config", "cfg.yaml", "-n", "--cores", "1"], capture_output=True,
                         text=True, env=workflow_env(tmp_path), cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr + res.stdout
    out = res.stdout + res.stderr
    assert "sniff_chunk" in out and "push_hub" in out and "dry-run" in out
    assert not (tmp_path / "root" / "staging").exists()
    # the workflow wrote the validated config its rules read
    assert load_config(tmp_path / "root" / ".qk-sniffer" / "config.yaml") == load_config(path)


def test_effective_config_is_rewritten_only_when_it_changes(tmp_path):
    cfg = base_config(tmp_path / "root")
    path = write_effective_config(cfg)
    assert path == effective_config_path(cfg) == tmp_path / "root" / ".qk-sniffer" / "config.yaml"
    assert load_config(path) == cfg
    before = path.stat().st_mtime_ns
    os.utime(path, ns=(before - 10**9, before - 10**9))
    write_effective_config(cfg)
    assert path.stat().st_mtime_ns == before - 10**9  # same content: left alone
    cfg["inference"]["batch_size"] = 3
    write_effective_config(cfg)
    assert path.stat().st_mtime_ns != before - 10**9
    assert load_config(path)["inference"]["batch_size"] == 3


def test_repo_layout_the_cli_relies_on():
    assert SNAKEFILE == REPO / "Snakefile" and SNAKEFILE.is_file()
    assert (DEFAULT_PROFILE / "config.yaml").is_file()
