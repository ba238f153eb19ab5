# render_readme: the dataset card (front matter with every config and aggregate per split, and
# the run's metadata), plus a copy at output.readme_path when set.
# update(): the card keeps the metadata of the other splits, so it is read before it is
# rewritten; Snakemake must not delete it before the job.


rule render_readme:
    input:
        "{root}/final/.merged.json",
    output:
        update("{root}/final/README.md"),
    log:
        qk_log("render_readme"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
    shell:
        qk("render-readme")
