# merge_staging: replay every complete staged chunk into final/ (new rows only; touched files
# only). Runs after the pull and whenever a chunk manifest is newer than .merged.json.
# update(): merge reads the previous .merged.json, so Snakemake must not delete it first.


rule merge_staging:
    input:
        snapshot=root_path("final/.snapshot.json"),
        manifests=CHUNK_MANIFESTS,
    output:
        update(root_path("final/.merged.json")),
    log:
        root_path("logs/merge_staging.log"),
    params:
        config=CONFIG_FILE,
    conda:
        CONDA_ENV
    shell:
        "$QK_PYTHON -m qk_sniffer merge --config {params.config} > {log} 2>&1"
