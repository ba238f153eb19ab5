"""The error a merge refuses with, and the messages for files it cannot read."""

from __future__ import annotations

from pathlib import Path

from ..errors import QkSnifferError


class MergeError(QkSnifferError, ValueError):
    """Merging would corrupt or mix the dataset; the message names the files and the fix."""


def corrupt_final(path: Path, exc: BaseException) -> MergeError:
    """A file of ``final/`` that is not readable Parquet: nothing was merged into it; how to recover."""
    return MergeError(
        f"{path} is not readable Parquet ({type(exc).__name__}: {exc}). Nothing was merged into it. Recover by "
        f"deleting it and either pulling the remote again (delete final/.snapshot.json and rerun pull_hub) or "
        f"rerunning the chunks that produced it, then merge again."
    )


def corrupt_staged(path: Path, exc: BaseException) -> MergeError:
    """A staged file that is not readable Parquet: its chunk is to be run again."""
    return MergeError(f"staged file {path} is not readable Parquet ({exc}); delete its chunk dir and rerun it")
