# pull_hub and push_hub: the remote dataset (output.hf_repo_id or output.remote_dir) of dataset root
# {root}, once for all the sweep members that share it (see common.smk).
#
# When pull_hub runs: it takes every chunk manifest as input, so it reruns whenever chunks
# produced something new, as late as possible (right before merge_staging), which keeps the
# window in which somebody else can push small. It also reruns when the remote settings change
# (params.remote), and when its snapshot is missing. When the remote has not moved, pull() sees
# the revision recorded in the snapshot and returns at once; update() keeps Snakemake from
# deleting the snapshot before the job, so that check can happen. Nothing new to merge means no
# pull: to fetch what others pushed meanwhile, run with --forcerun pull_hub. push_hub's commit is
# guarded by the pulled revision anyway: if the remote moved, it pulls, merges and retries.


rule pull_hub:
    input:
        dataset_manifests,
    output:
        update("{root}/final/.snapshot.json"),
    log:
        qk_log("pull_hub"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
        remote=dataset_remote,
    shell:
        qk("pull")


rule push_hub:
    input:
        "{root}/final/README.md",
        "{root}/verify.json",
    output:
        "{root}/push.json",
    log:
        qk_log("push_hub"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
        remote=dataset_remote,
    shell:
        qk("push")
