# sniff_chunk: dataset shard {chunk} of workflow.num_chunks through the model, for the member whose
# member root is {root} (a single config: its data root; see common.smk). The chunks of every member of
# a sweep are jobs of this one rule, scheduled together under --resources gpu=N and under the SLURM
# profile. Members sharing a dataset and tokenizer share the tokenized shard (qk_sniffer/tokens.py).
#
# Reruns when its manifest is missing (a crashed chunk has none: the manifest is written last),
# or when params.fingerprint changes: it hashes everything that changes the rows a chunk produces
# (dataset, model, tokenizer max_length, capture settings, split, num_chunks) but not batch size or
# padding side. resources.gpu is what Snakemake counts against --resources gpu=N; which GPUs a job
# uses is decided inside the job by a lease on lock files (qk_sniffer.gpu), or by the scheduler
# under SLURM. threads can be changed with --set-threads sniff_chunk=N.


rule sniff_chunk:
    output:
        "{root}/staging/chunk-{chunk}/manifest.json",
    log:
        "{root}/logs/sniff_chunk/chunk-{chunk}.log",
    params:
        config=member_config,
        num_chunks=member_num_chunks,
        fingerprint=member_fingerprint,
    wildcard_constraints:
        root=one_of(MEMBER_ROOTS),
        chunk=r"\d+",
    threads: 2
    resources:
        gpu=member_gpus,
    conda:
        CONDA_ENV
    shell:
        "$QK_PYTHON -m qk_sniffer sniff-chunk --config {params.config} --chunk {wildcards.chunk}"
        " --num-chunks {params.num_chunks} --fingerprint {params.fingerprint} --threads {threads} > {log} 2>&1"
