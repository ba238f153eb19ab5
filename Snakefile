# qk-sniffer: capture sampled query/key vectors of a causal LM into a Parquet dataset that
# datasets.load_dataset reads directly (locally or from the Hugging Face Hub).
#
#   snakemake --cores all                              the embedded demo (config/config.yaml), from the repo root
#   snakemake -s /path/to/Snakefile --directory WORK --configfile CFG --cores all
#   sniff-qk --config CFG                              the same through the CLI (adds --cores and --resources gpu=N)
#   snakemake --configfile A B ... / sniff-qk --config A B ...   a sweep: every config a member, one DAG
#
# Every run gets the project's defaults from the workflow profile profiles/default (a link to
# workflow/profiles/default), which Snakemake finds next to this file by itself.
#
# Paths in the config are relative to the working directory (--directory, else the current one).
# Every rule makes one file target under the data root (output.data_root) and calls into the
# qk_sniffer package once; its log is under <data_root>/logs/:
#
#   sniff_chunk    staging/chunk-{chunk}/manifest.json   one dataset shard through the model
#   pull_hub       final/.snapshot.json                  the remote dataset synced into final/
#   merge_staging  final/.merged.json                    staged rows replayed into final/
#   render_readme  final/README.md                       the dataset card
#   verify_dataset verify.json                           the dataset checked before any push
#   render_report  report/                               figures of snakemake --report
#   push_hub       push.json                             one commit of the changed files
#
# In a sweep, sniff_chunk runs per member under its member root, the other rules once per data root
# for the members sharing it (workflow/rules/common.smk, qk_sniffer/sweep.py).
#
# Rerunning redoes only missing or outdated targets; one chunk reruns alone when its manifest is
# named as the target. See workflow/rules/*.smk for what triggers each rule.

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from qk_sniffer.config import ConfigError
from qk_sniffer.sweep import plan_workflow

min_version("9.0")


# The embedded demo config is the run's config only when no --configfile is given: a config given
# with --configfile is complete by itself (real-model configs mirror the original tool's format), so
# the demo's dataset files, split name and data root never leak into another run. Several
# --configfile are a sweep: each file is one member (or the members of its `sweep:` list), all run in
# this one DAG (qk_sniffer/sweep.py places them and refuses two members writing one split).
# --config KEY=VALUE overrides apply to every member, and to the demo.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


# The package's validator checks every member against workflow/schemas/config.schema.yaml (one
# pass; its messages name the key path and suggest the closest key for a typo) and fills in every
# default. The rules read the members from PLAN; `config` stays what Snakemake merged from the
# --configfile files (or the demo) and --config, read only by the report's description for its model.
try:
    PLAN = plan_workflow(workflow.overwrite_configfiles, config, workflow.config_settings.config)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


include: "workflow/rules/common.smk"
include: "workflow/rules/sniff.smk"
include: "workflow/rules/hub.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/readme.smk"
include: "workflow/rules/verify.smk"
include: "workflow/rules/report.smk"


# These rules touch the network or the shared data root, not a GPU: they run on the machine that
# drives the workflow, also under a cluster executor.
localrules:
    all,
    pull_hub,
    merge_staging,
    render_readme,
    verify_dataset,
    render_report,
    push_hub,


rule all:
    default_target: True
    input:
        # per dataset root: push.json always exists after a run (with no remote it records pushed: false)
        expand("{root}/push.json", root=DATASET_ROOTS),
        # and the figures that `snakemake --report report.html` collects
        expand(rules.render_report.output, root=DATASET_ROOTS),


# Every member has its chunks: the tokens sweep members shared are not needed any more (a failed run
# keeps them for its rerun).
onsuccess:
    clear_shared_tokens()
