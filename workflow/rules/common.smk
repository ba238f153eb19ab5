# Shared values of the rules: the data root, the effective config file and the interpreter.
# No rules here; the logic lives in the qk_sniffer package.

import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from qk_sniffer.cli import write_effective_config
from qk_sniffer.config import chunk_fingerprint, data_root


# The data root, relative to the working directory unless the config gives an absolute path.
ROOT = data_root(config).as_posix()


def root_path(rel):
    """A path under the data root, as Snakemake wants it (normalised, no leading ./)."""
    return (Path(ROOT) / rel).as_posix()


# The validated effective config (after --configfile/--config, defaults filled in) is what the
# rules hand to `python -m qk_sniffer`. It is rewritten only when its content changes, so its mtime
# does not churn; it is deliberately not an input of any rule: which rules rerun is decided by
# the params below (for chunks, the fingerprint of everything that changes their rows).
CONFIG_FILE = write_effective_config(config).as_posix()

NUM_CHUNKS = config["workflow"]["num_chunks"]
CHUNK_MANIFESTS = [root_path(f"staging/chunk-{i}/manifest.json") for i in range(NUM_CHUNKS)]
CHUNK_FINGERPRINT = chunk_fingerprint(config)
GPUS_PER_CHUNK = 0 if config["inference"]["device"] == "cpu" else config["workflow"]["gpus_per_chunk"]
REMOTE = {k: config["output"][k] for k in ("hf_repo_id", "hf_branch", "remote_dir")}
# What the report waits for besides the card: the push, where the push can change final/ (a remote that
# moved makes it pull, merge and render again, and the report must show that). With no remote the push only
# writes push.json, so the report runs beside verify and push.
REPORT_AFTER_PUSH = [root_path("push.json")] if REMOTE["hf_repo_id"] or REMOTE["remote_dir"] else []

# The conda environment of every rule, used with --use-conda (relative to this directory).
CONDA_ENV = "../../environment.yml"

# Rules run `$QK_PYTHON -m qk_sniffer ...`: the interpreter running Snakemake (it has qk_sniffer
# installed), or the rule's own environment's `python` under --use-conda. Set through the shell
# prefix rather than params, so a different interpreter path does not count as a params change.
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    QK_PYTHON = "python"
else:
    QK_PYTHON = shlex.quote(sys.executable)
shell.prefix("set -euo pipefail; QK_PYTHON={}; ".format(QK_PYTHON.replace("{", "{{").replace("}", "}}")))
