"""The fault trials' settings: the stages aimed at, chunk count, timeouts, each stage's target, temporary names."""

from __future__ import annotations

STAGES = ("sniff_chunk", "merge_staging", "render_readme", "push_hub")
PUSH_TRIGGERS = ("preupload", "lfs_batch", "lfs_put", "commit", "commit_answer_lost")
NUM_CHUNKS = 3
SPLIT = "tiny"
USER = "tester"
RUN_TIMEOUT = 600.0  # seconds for one snakemake invocation
MAX_RERUNS = 4  # --rerun-incomplete attempts after the first kill
SECOND_KILL_P = 0.3  # share of trials whose first rerun is killed as well,
SECOND_KILL_WITHIN = 8.0  # at most this many seconds after it started (a rerun of the late stages takes about 10)
POLL = 0.005
# outputs of the rules, relative to the data root, in the order the workflow makes them
TARGETS = {
    "pull_hub": "final/.snapshot.json",
    "merge_staging": "final/.merged.json",
    "render_readme": "final/README.md",
    "verify_dataset": "verify.json",
    "push_hub": "push.json",
}
TEMP_MARKERS = (".tmp", ".pull-tmp-")
