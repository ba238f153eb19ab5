"""The effective config: the validated config (defaults filled in) the workflow writes for its rules, at
``<data_root>/.qk-sniffer/config.yaml``; every rule passes it to ``sniff-qk <stage> --config``."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import data_root
from .layout import write_text_if_changed

EFFECTIVE_CONFIG = Path(".qk-sniffer") / "config.yaml"


def effective_config_path(cfg: dict, root: Path | None = None) -> Path:
    """``<data_root>/.qk-sniffer/config.yaml``: the validated config the workflow's rules read."""
    return (Path(root) if root is not None else data_root(cfg)) / EFFECTIVE_CONFIG


def write_effective_config(cfg: dict, root: Path | None = None) -> Path:
    """Write the validated config for the rules, only when its content changed (so its mtime stays put)."""
    path = effective_config_path(cfg, root)
    text = (
        "# The validated configuration (defaults filled in) the workflow passes to its rules.\n"
        "# Written by the Snakefile on every invocation; edit the config you run with, not this copy.\n"
        + yaml.safe_dump(cfg, sort_keys=True, default_flow_style=False, allow_unicode=True)
    )
    write_text_if_changed(path, text)
    return path
