"""The stages of a dataset root that several sweep members share (see :mod:`qk_sniffer.sweep`).

The rules pass one ``--config`` per member (the first member's data root is the dataset root; the others'
``final`` links to it). Each stage does, once for the dataset, what it does for a single config:

- ``pull``: sync ``final/`` with the remote, once;
- ``merge``: each member's staged chunks into the shared ``final/``, in order, each followed by its card
  section (the card takes a split's run metadata from ``final/.merged.json``, which holds the last merge only);
- ``render-readme``: every member's section of the one card;
- ``verify``: the shared ``final/`` and card once, and every member's staged chunks;
- ``push``: one push of everything; when the remote moved meanwhile: pull, merge every member, render, verify
  and push again (at most ``output.max_push_retries`` times, like a single config's push);
- ``report``: the figures of every split of the dataset.

The push of a single config lives here too (:func:`push_one`): :func:`qk_sniffer.remote.sync.push` knows
nothing of merging, so the stage layer hands it the replay step (:func:`replay_merge`) it runs after pulling
a remote that moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import data_root

log = logging.getLogger("qk_sniffer")


def pull_all(cfgs: list[dict]) -> dict:
    from .remote.sync import pull

    return pull(cfgs[0])


def merge_all(cfgs: list[dict]) -> list[dict]:
    from .card import render_readme
    from .merge import merge_staging

    results = []
    for cfg in cfgs:
        results.append(merge_staging(cfg))
        render_readme(cfg)
    return results


def render_all(cfgs: list[dict]) -> Path:
    from .card import render_readme

    out = None
    for cfg in cfgs:
        out = render_readme(cfg)
    return out


def verify_all(cfgs: list[dict]):
    """The shared dataset and card checked once (with the first member's config), every member's staging too."""
    from .verify import verify, verify_staging

    report = verify(data_root(cfgs[0]), cfg=cfgs[0])
    for cfg in cfgs[1:]:
        part = verify_staging(data_root(cfg), cfg=cfg)
        where = data_root(cfg).as_posix()
        report.problems += [f"{where}/{p}" for p in part.problems]
        report.warnings += [f"{where}/{w}" for w in part.warnings]
        for key in ("chunks", "staged_files"):
            report.checked[key] += part.checked[key]
    return report


def replay_merge(cfg: dict, root: Path | None = None) -> None:
    """The replay of a single config's push onto a moved remote, after the pull: merge its staged chunks into
    ``final/`` again, render the card and verify; raises :class:`~qk_sniffer.remote.base.PushError` when what
    the retry would publish fails verification."""
    from .card import render_readme
    from .merge import merge_staging
    from .remote.base import PushError
    from .verify import verify

    root = Path(root) if root is not None else data_root(cfg)
    merge_staging(cfg, root)
    render_readme(cfg, root)
    report = verify(root, cfg=cfg)
    if not report.ok:
        raise PushError(f"after re-merging onto the moved remote, {root} fails verification; nothing more "
                        f"was pushed:\n{report.format()}")


def push_one(cfg: dict, root: Path | None = None, **limits) -> dict:
    """The push stage of a single config: :func:`~qk_sniffer.remote.sync.push` with :func:`replay_merge` as its
    replay. ``limits`` (``max_files``, ``max_bytes``) pass through."""
    from .remote.sync import push

    return push(cfg, root, replay=lambda: replay_merge(cfg, root), **limits)


def push_all(cfgs: list[dict]) -> dict:
    from .remote.base import PushError, RemoteMovedError
    from .remote.sync import push

    first = cfgs[0]
    retries = int(first["output"].get("max_push_retries", 3))
    for attempt in range(retries + 1):
        try:
            return push(first, replay=None)  # a moved remote comes back here: every member is merged again
        except PushError as exc:
            if not isinstance(exc.__cause__, RemoteMovedError):
                raise
            if attempt >= retries:
                raise PushError(
                    f"push of {data_root(first)} failed: the remote moved {attempt + 1} time(s) while pushing (another "
                    "run is pushing to it). Rerun the workflow to pull, merge and push again, or raise "
                    "output.max_push_retries."
                ) from exc
            log.warning("the remote moved (%s); pulling, merging %d members and retrying (%d of %d)", exc.__cause__,
                        len(cfgs), attempt + 1, retries)
            pull_all(cfgs)
            merge_all(cfgs)
            render_all(cfgs)
            report = verify_all(cfgs)
            if not report.ok:
                raise PushError(f"after re-merging onto the moved remote, {data_root(first)} fails verification; "
                                f"nothing more was pushed:\n{report.format()}") from exc
    raise AssertionError("unreachable")  # pragma: no cover


def report_all(cfgs: list[dict], out: str | None) -> list[Path]:
    from .report import report_main

    return report_main(cfgs[0], out)
