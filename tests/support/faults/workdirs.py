"""A trial's working directory (config ``cfg.yaml``) and the environment its snakemake process runs in."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..fakehub import FakeHub
from ..workflow_runs import make_workdir, write_yaml
from .settings import (
    NUM_CHUNKS,
)

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


def set_repo(work: Path, repo_id: str) -> None:
    cfg = yaml.safe_load((work / "cfg.yaml").read_text(encoding="utf-8"))
    cfg["output"]["hf_repo_id"] = repo_id
    write_yaml(work / "cfg.yaml", cfg)
