# render_report: the figures and tables that `snakemake --report report.html` collects, drawn from
# the final dataset (every split under final/data/) and this run's staged chunk manifests.
# Captions: workflow/report/*.rst. It reads the card's per-split metadata, so it runs after
# render_readme (and after push_hub where there is a remote: report_after_push in common.smk), and
# it is part of `rule all`: `snakemake --report` only collects files of jobs in
# the workflow's graph. It streams one config file at a time (a few seconds on the demo) and
# writes only under <data_root>/report/, never into final/ (so nothing it draws gets pushed).
# One figure per split: the figure folders are directory outputs whose files are picked up by
# `patterns`, whose wildcards name the split in the report.


rule render_report:
    input:
        readme="{root}/final/README.md",
        manifests=dataset_manifests,
        # after the push when there is a remote: a push that finds it moved pulls, merges and renders final/
        # again (with no remote, nothing after the card changes final/: the report runs beside verify and push)
        pushed=report_after_push,
    output:
        rows=report(
            directory("{root}/report/rows_per_bucket"),
            patterns=["{split}.png"],
            caption="../report/rows_per_bucket.rst",
            category="Sampling",
            subcategory="rows per bucket",
            labels={"split": "{split}"},
        ),
        norms=report(
            directory("{root}/report/norms"),
            patterns=["{split}/{vectors}.png"],
            caption="../report/norms.rst",
            category="Vector norms",
            subcategory="{split}",
            labels={"split": "{split}", "vectors": "{vectors}"},
        ),
        heads=report(
            directory("{root}/report/heads"),
            patterns=["{split}.png"],
            caption="../report/heads.rst",
            category="Heads",
            subcategory="norms and q-k cosine",
            labels={"split": "{split}"},
        ),
        timings=report(
            "{root}/report/run/chunk_timings.png",
            caption="../report/chunk_timings.rst",
            category="Run",
            labels={"item": "throughput per chunk"},
        ),
        metadata=report(
            "{root}/report/run/run_metadata.html",
            caption="../report/run_metadata.rst",
            category="Run",
            labels={"item": "model, dataset, sampler"},
        ),
        stats=report(
            "{root}/report/run/stats.json",
            caption="../report/stats.rst",
            category="Run",
            labels={"item": "numbers behind the figures"},
        ),
    log:
        qk_log("render_report"),
    wildcard_constraints:
        root=one_of(DATASET_ROOTS),
    conda:
        CONDA_ENV
    params:
        config=dataset_config,
        # <data_root>/report, derived from an output so it follows the outputs wherever they are
        out=lambda wildcards, output: Path(output.rows).parent.as_posix(),
    shell:
        qk("report", "--out {params.out}")
