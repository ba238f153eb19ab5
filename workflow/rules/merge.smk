# merge_staging: replay every complete staged chunk into final/ (new rows only; touched files
# only). Runs after the pull and whenever a chunk manifest is newer than .merged.json.
# update(): merge reads the previous .merged.json, so Snakemake must not delete it first.
# Sweep members sharing dataset root {root} are merged one after the other, each followed by its
# section of the card (qk_sniffer/sweep_stages.py).


rule merge_staging:
    input:
        snapshot="{root}/final/.snapshot.json",
        manifests=dataset_manifests,
    output:
        update("{root}/final/.merged.json"),
    log:
        qk_log("merge_staging"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
    shell:
        qk("merge")
