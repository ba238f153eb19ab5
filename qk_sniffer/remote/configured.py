"""The remote a config names: :func:`remote_for`."""

from __future__ import annotations

from ..config import ConfigError
from .base import Remote
from .directory import DirRemote
from .hub import HubRemote


def remote_for(cfg: dict) -> Remote | None:
    """The configured remote: ``output.remote_dir`` (a directory), ``output.hf_repo_id`` (the Hub), or None."""
    out = cfg["output"]
    if out.get("remote_dir") and out.get("hf_repo_id"):
        raise ConfigError(
            "output.remote_dir and output.hf_repo_id are both set; a run pushes to one remote: "
            "remove one of them"
        )
    if out.get("remote_dir"):
        return DirRemote(out["remote_dir"])
    if out.get("hf_repo_id"):
        return HubRemote(cfg)
    return None
