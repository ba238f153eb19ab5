# sniff_chunk: the examples of chunk {chunk} (its plan file holds the range) through the model, for the member whose
# member root is {root} (a single config: its data root; see common.smk). The chunks of every member of
# a sweep are jobs of this one rule, scheduled together under --resources gpu=N and under the SLURM
# profile. Members sharing a dataset and tokenizer share the tokenized shard (qk_sniffer/chunk/tokens.py).
#
# Reruns when its manifest is missing (a crashed chunk has none: the manifest is written last), or when
# its plan file is newer than its manifest: the preflight makes it so for a chunk whose manifest records
# another fingerprint or example range (qk_sniffer/chunk/plan.py), from any working directory and without
# Snakemake's records. Snakemake's own triggers work on top: params.fingerprint hashes everything that
# changes the rows of a range of examples (dataset, model, tokenizer max_length, capture settings, split)
# but not batch size, padding side, max_samples or the chunking. resources.gpu is what Snakemake counts
# against --resources gpu=N; which GPUs a job uses is decided inside the job by a lease on lock files
# (qk_sniffer.chunk.gpu), or by the scheduler under SLURM. threads can be changed with --set-threads sniff_chunk=N.


rule sniff_chunk:
    input:
        plan="{root}/.qk-sniffer/chunks/chunk-{chunk}.json",
    output:
        "{root}/staging/chunk-{chunk}/manifest.json",
    log:
        qk_log("sniff_chunk/chunk-{chunk}"),
    wildcard_constraints:
        root=one_of(MEMBER_ROOTS),
        chunk=r"\d+",
    conda:
        CONDA_ENV
    threads: 2
    resources:
        gpu=member_gpus,
    params:
        config=member_config,
        fingerprint=member_fingerprint,
    shell:
        qk("sniff-chunk", "--chunk {wildcards.chunk} --plan {input.plan} --threads {threads}")
