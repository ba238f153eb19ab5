# Shared values of the rules: the members and data roots, their effective config files, the interpreter, and
# the stanzas repeated in each rule (its log path, qk_log; its one call into qk_sniffer, qk).
# No rules here; the logic lives in the qk_sniffer package.

import re
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod

from qk_sniffer.preflight import (
    PreflightError,
    dry_run_requested,
    lint_requested,
    load_plans,
    preflight,
)
from qk_sniffer.sweep import TOKEN_CACHE
from qk_sniffer.sweep import prepare as prepare_plan
from qk_sniffer.chunk.tokens import clear as clear_tokens

# PLAN (built by the Snakefile from the config files) places every member: its member root (where its
# chunks are staged and logged, the output.data_root of its effective config) and its dataset root (the
# data root whose final/ it is merged into, pulled and pushed; shared by the members publishing to one
# branch). A single config is one member whose two roots are its data root. Roots are relative to the
# working directory unless the config gives absolute paths. The rules match them with a {root} wildcard
# restricted to these paths.
MEMBER_ROOTS = list(dict.fromkeys(m.root for m in PLAN.members))
DATASET_ROOTS = list(PLAN.datasets)


def one_of(paths):
    """A wildcard constraint matching exactly these paths."""
    return "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))


# The validated effective config of each member (after --configfile/--config, defaults filled in) is
# what the rules hand to `python -m qk_sniffer`: <member root>/.qk-sniffer/config.yaml. It is rewritten
# only when its content changes, so its mtime does not churn; it is deliberately not an input of any
# rule. Sweep members also get their shared-tokens sidecar and final/ link here.
prepare_plan(PLAN)

# The preflight (qk_sniffer/preflight.py), on the machine driving the workflow only: the dataset, the model
# without weights and the remote are checked before any job is scheduled, and each member's chunks are planned
# from what its data root records. Which chunks rerun is decided there, from the manifests alone, and handed
# to Snakemake through each chunk's plan file <member root>/.qk-sniffer/chunks/chunk-N.json (the input of
# sniff_chunk: older than the manifest when the chunk is up to date, newer when it must run again). A job a
# cluster executor starts parses this file again and reads the plan files instead. A dry run reports a remote
# that would refuse the push as a line instead of stopping (it needs no token); --lint runs no preflight.
if workflow.is_main_process and not lint_requested(sys.argv):
    try:
        for _line in preflight(PLAN, dry_run=workflow.dryrun or dry_run_requested(sys.argv)):
            print(_line, file=sys.stderr)
    except PreflightError as exc:
        raise WorkflowError(f"preflight: {exc}") from None
else:
    load_plans(PLAN)


def member_config(wildcards):
    return PLAN.member(wildcards.root).config_path


def member_fingerprint(wildcards):
    return PLAN.member(wildcards.root).fingerprint


def member_gpus(wildcards):
    return PLAN.member(wildcards.root).gpus


def dataset_config(wildcards):
    """One config path, or one per member when several share the dataset root (stages then run for all)."""
    return PLAN.configs(wildcards.root)


def dataset_manifests(wildcards):
    """Every chunk manifest of every member of the dataset root."""
    return PLAN.manifests(wildcards.root)


def dataset_remote(wildcards):
    return PLAN.remote(wildcards.root)


def report_after_push(wildcards):
    """What the report waits for besides the card: the push, where the push can change final/ (a remote
    that moved makes it pull, merge and render again, and the report must show that). With no remote
    the push only writes push.json, so the report runs beside verify and push."""
    remote = PLAN.remote(wildcards.root)
    return [f"{wildcards.root}/push.json"] if remote["hf_repo_id"] or remote["remote_dir"] else []


def clear_shared_tokens():
    clear_tokens(Path.cwd() / TOKEN_CACHE)


# The software of every rule, named for the record (`snakemake --lint` asks each rule for one; relative
# to this directory): environment.yml, the environment that runs Snakemake itself. The rules run in that
# same interpreter; --use-conda is not supported (README.md, "Software environment", says why).
CONDA_ENV = "../../environment.yml"
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    raise WorkflowError(
        "--use-conda is not supported: the rules run `python -m qk_sniffer` with the interpreter that runs "
        "Snakemake; install qk-sniffer there (bash .ci/setup, or environment.yml) and run without --use-conda"
    )

# Rules run `$QK_PYTHON -m qk_sniffer ...`: the interpreter running Snakemake (it has qk_sniffer installed).
# Set through the shell prefix rather than params, so a different interpreter path does not count as a
# params change.
QK_PYTHON = shlex.quote(sys.executable)
shell.prefix("set -euo pipefail; QK_PYTHON={}; ".format(QK_PYTHON.replace("{", "{{").replace("}", "}}")))


def qk_log(name):
    """The log of a job, <root>/logs/<name>.log; name may hold wildcards (sniff_chunk/chunk-{chunk})."""
    return f"{{root}}/logs/{name}.log"


def qk(stage, *options):
    """The one call of a rule: `python -m qk_sniffer <stage> --config {params.config} <options>`, stdout
    and stderr into {log}. options are further arguments in shell-directive format ("--out {params.out}").
    The command is the same string the rules always ran, so Snakemake's code trigger sees no change."""
    return " ".join(("$QK_PYTHON -m qk_sniffer", stage, "--config {params.config}", *options, "> {log} 2>&1"))
