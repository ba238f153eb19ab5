# verify_dataset: check the final dataset, its card and the staged chunks before anything is
# pushed (schema, unique sorted keys, layer/head/kind against paths, buckets and sampling
# decisions of the recorded sampler, README configs against the files, manifests against staged
# files). A problem fails the job, so push_hub never publishes a damaged dataset.


rule verify_dataset:
    input:
        "{root}/final/README.md",
    output:
        "{root}/verify.json",
    log:
        qk_log("verify_dataset"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
    shell:
        qk("verify", "--json {output}")
