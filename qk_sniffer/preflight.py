"""The preflight: what a run checks once, on the machine that drives the workflow, before any chunk job is queued
(README.md, "Before any chunk runs").

For every member of the plan: the dataset (reachable, split present, text and id columns present and typed, rows,
ids unique), the chunks (which exist, which must run and why: :mod:`qk_sniffer.chunk.plan`), and, when any of its
chunks will run, the model without its weights (config, tokenizer, attention implementation, layers, heads and
head sampling, position limit). For every dataset root with a remote: the token and the remote (reachable,
the right kind of repository, writable). Only when everything passed are the chunk plan files written.

The Snakefile calls :func:`preflight` while it builds the DAG, so a bad config fails there in one line, in
Snakemake's own output, before any job is scheduled (under a cluster executor: before any ``sbatch``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .chunk.plan import MemberChunks, decide, read_plans, write_plans
from .config import ConfigError
from .errors import is_expected

log = logging.getLogger("qk_sniffer")


class PreflightError(ConfigError):
    """A check failed; the message is the one line the user reads, naming the field or file and the fix."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if not isinstance(exc, OSError) or "Errno" not in text else f"{type(exc).__name__}: {text}"


def preflight(plan, *, check_remotes: bool = True, dry_run: bool = False) -> list[str]:
    """Check every member and dataset root of ``plan`` (a :class:`qk_sniffer.sweep.Plan`); set each member's
    ``chunks``, write the plan files, and return the lines to show (which chunks run and why).

    Raises :class:`PreflightError` with one line when a check fails; nothing is written then. In a dry run
    (``dry_run``) a remote that would refuse the push is a line of the output instead: a dry run shows what a run
    would do and needs no token.
    """
    from .model_check import check_model
    from .source_check import check_source

    try:
        rows_of: dict[str, int | None] = {}
        decided: list[MemberChunks] = []
        lines: list[str] = []
        for m in plan.members:
            from .legacy import refuse_local

            refuse_local(Path(m.root))  # the original tool's dataset in the data root: sniff-qk migrate first
            key = json.dumps(m.cfg["dataset"], sort_keys=True, default=str)
            if key not in rows_of:
                rows_of[key] = check_source(m.cfg).rows
            chunks = decide(m.cfg, Path(m.root), rows_of[key])
            if any(d.runs for d in chunks.decisions):
                check_model(m.cfg)
            m.chunks = chunks.specs
            decided.append(chunks)
            lines += chunks.summary()
        if check_remotes:
            lines += _check_remotes(plan, dry_run)
    except PreflightError:
        raise
    except Exception as exc:
        if not is_expected(exc):
            raise
        raise PreflightError(_one_line(exc)) from exc
    for chunks in decided:
        write_plans(chunks)
    return lines


def dry_run_requested(argv: list[str]) -> bool:
    """Whether a snakemake command line asks for a dry run (``-n``, ``--dry-run``, ``--dryrun``, or ``-n`` among
    clustered one-letter flags such as ``-np``). Snakemake reads the Snakefile before it sets up the dry run, so
    the preflight cannot ask the workflow object."""
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg in ("-n", "--dry-run", "--dryrun") or (len(arg) > 2 and arg[0] == "-" and arg[1] != "-"
                                                      and arg[1:].isalpha() and "n" in arg):
            return True
    return False


def lint_requested(argv: list[str]) -> bool:
    """Whether a snakemake command line only lints the workflow (``--lint``): no preflight then, nothing read or
    written but the workflow's own files."""
    return any(a == "--lint" or a.startswith("--lint=") for a in argv[1:])


def _check_remotes(plan, dry_run: bool) -> list[str]:
    from .remote.check import check_remote

    lines = []
    for members in plan.datasets.values():
        try:
            where = check_remote(members[0].cfg)
        except Exception as exc:
            if not dry_run or not is_expected(exc):
                raise
            lines.append(f"{members[0].dataset}: a real run stops here: {_one_line(exc)}")
            continue
        if where and where != "no remote":
            lines.append(f"{members[0].dataset}: {where}")
    return lines


def load_plans(plan) -> None:
    """Each member's chunks as the plan files record them (a job started by a cluster executor parses the
    workflow again; the preflight already ran on the machine that submitted it)."""
    for m in plan.members:
        m.chunks = read_plans(Path(m.root))
