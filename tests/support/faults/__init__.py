"""Fault injection: SIGKILL the whole workflow at seeded random moments, resume it, compare with a clean run.

Each trial runs the tiny-model workflow (``snakemake -s Snakefile --directory WORK --configfile CFG
--cores 2`` in its own process group, pushing to a repository on the fake Hub of tests/support/fakehub/,
which runs in this process) and kills the process group with SIGKILL at a moment chosen by a seeded
random generator, inside one of four stages:

- ``sniff_chunk``: once a chosen chunk's log appears, after a random part of that chunk's duration
  (start-up and model loading, mostly), or once its progress bar shows that its batches started,
  after a random part of their duration (mid-batch, or while the chunk's files are written);
- ``merge_staging``: once the merge log appears, or once the merge's first temporary file appears in
  ``final/`` (the moment it starts writing), after a random delay;
- ``render_readme``: once its log appears, after a random part of the stage's duration;
- ``push_hub``: the moment the fake Hub sees the push's first preupload, LFS batch, LFS upload or
  commit request, or after the fake has applied a commit and dropped the connection instead of
  answering (the push is killed while it waits to retry).

After every kill the remote must hold no half commit (every commit on the branch: its Parquet
files read, its README lists only files present, no temporary names) and nothing in the data root
may be a damaged file. Then ``--unlock`` and ``--rerun-incomplete`` until the workflow completes (a
rerun is itself killed in some trials). The result must equal an uninterrupted reference run of
the same config: the same rows in every config, the same README ``configs``, the remote's files
equal to ``final/`` byte for byte, ``qk_sniffer.verify`` passing, and no temporary file left in the
data root or the remote.

Trials aimed at the stages after the chunks start from a copy of the reference's working directory
taken once its chunks were staged, so only the sniff_chunk trials pay for the model runs. The full
run, 20 trials (about 10 minutes on 2 cores), from the repository root:

    python -m tests.support.faults --trials 20 --seed 0

(``QK_FAULT_TRIALS=20 pytest tests/test_faults.py -k random`` runs the same through pytest.)
"""

from .checks import (
    card_configs,
    card_globs,
    final_has_temp,
    glob_match,
    incomplete_jobs,
    is_temp_name,
    local_problems,
    read_configs,
    remote_problems,
    resumed_chunks,
    rule_of,
    temp_files,
    tree_problems,
)
from .harness import FaultHarness, TrialResult
from .runs import WATCHED, Attempt, KillPlan, Timings, run_snakemake, watch_files
from .settings import (
    MAX_RERUNS,
    NUM_CHUNKS,
    POLL,
    PUSH_TRIGGERS,
    RUN_TIMEOUT,
    SECOND_KILL_P,
    SECOND_KILL_WITHIN,
    SPLIT,
    STAGES,
    TARGETS,
    TEMP_MARKERS,
    USER,
)
from .summary import scan_for, summarize
from .workdirs import WORKDIR_SECTIONS, hub_env, set_repo, trial_workdir

__all__ = [
    "Attempt",
    "FaultHarness",
    "KillPlan",
    "MAX_RERUNS",
    "NUM_CHUNKS",
    "POLL",
    "PUSH_TRIGGERS",
    "RUN_TIMEOUT",
    "SECOND_KILL_P",
    "SECOND_KILL_WITHIN",
    "SPLIT",
    "STAGES",
    "TARGETS",
    "TEMP_MARKERS",
    "Timings",
    "TrialResult",
    "USER",
    "WATCHED",
    "WORKDIR_SECTIONS",
    "card_configs",
    "card_globs",
    "final_has_temp",
    "glob_match",
    "hub_env",
    "incomplete_jobs",
    "is_temp_name",
    "local_problems",
    "read_configs",
    "remote_problems",
    "resumed_chunks",
    "rule_of",
    "run_snakemake",
    "scan_for",
    "set_repo",
    "summarize",
    "temp_files",
    "tree_problems",
    "trial_workdir",
    "watch_files",
]
