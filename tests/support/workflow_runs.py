"""Real workflow runs from the tests: working directories, ``snakemake`` commands and runs, what a run left behind.

A working directory holds a config file (``cfg.yaml`` unless named otherwise) whose data root is ``root``,
relative to the directory, so a copy of the directory (``copy_workdir``) is a self-contained second run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .tiny_data import REPO, base_config

SPLIT = "tiny"
RUN_TIMEOUT = 900  # seconds for one snakemake invocation
SNIFF_QK = Path(sys.executable).parent / "sniff-qk"


def workflow_env(tmp: Path, **extra: str) -> dict:
    """This process's environment for a run: no GPUs, GPU locks under ``tmp``, ``extra`` set, debug mode off."""
    env = {**os.environ, "QK_SNIFFER_GPUS": "", "QK_SNIFFER_GPU_LOCK_DIR": str(tmp / "gpu-locks"), **extra}
    env.pop("QK_SNIFFER_DEBUG", None)
    return env


def write_yaml(path: Path, data: dict) -> Path:
    """``data`` as a YAML file at ``path`` (keys in their order), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def make_workdir(path: Path, defaults: dict, name: str = "cfg.yaml", **sections) -> Path:
    """A working directory holding the config ``name``: ``base_config`` with data root ``root``, the config
    sections ``defaults``, and ``sections`` in place of the defaults' sections of the same name."""
    path.mkdir(parents=True, exist_ok=True)
    write_yaml(path / name, base_config(Path("root"), **{**defaults, **sections}))
    return path


def snakemake_cmd(workdir: Path, *extra: str, config: str = "cfg.yaml", cores: str | None = "2") -> list[str]:
    """The repository's Snakefile run in ``workdir`` on its config ``config``, with ``--cores`` unless None."""
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / config), *(("--cores", cores) if cores is not None else ()), *extra]


def snakemake(workdir: Path, *extra: str, config: str = "cfg.yaml", cwd: Path | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run ``snakemake_cmd`` to the end; with ``check``, a failure raises with its output and the data root's logs."""
    res = subprocess.run(snakemake_cmd(workdir, *extra, config=config), cwd=cwd or workdir, capture_output=True,
                         text=True, env=workflow_env(workdir.parent), timeout=RUN_TIMEOUT, check=False)
    if check and res.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "root" / "logs").rglob("*.log")))
        raise AssertionError(f"snakemake failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}\n{logs}")
    return res


def manifests(root: Path) -> dict[int, Path]:
    """Chunk index -> the manifest of each staged chunk of the data root ``root``."""
    return {int(p.parent.name.split("-")[1]): p for p in sorted(root.glob("staging/chunk-*/manifest.json"))}


def final_files(root: Path, split: str = SPLIT) -> dict[str, Path]:
    """Config name -> the final Parquet file of ``split`` in the data root ``root``, in name order."""
    return {p.parent.name: p for p in sorted((root / "final" / "data" / split).glob("*/data.parquet"))}


def mtimes(paths) -> dict[Path, int]:
    """Each path's modification time in nanoseconds."""
    return {p: p.stat().st_mtime_ns for p in paths}


def copy_workdir(src: Path, dst: Path) -> Path:
    """Copy a working directory with its modification times, so Snakemake sees the same state; returns ``dst``."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
