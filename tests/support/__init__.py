"""Support code for the tests: no tests here, only what several test files share.

- ``tiny_data``: the tiny Llama, the demo corpus, validated configs over them, real staged chunks and
  final datasets built in this process;
- ``rows``: comparing rows computed by different processes;
- ``workflow_runs``: working directories, ``snakemake`` commands and runs, readers of what a run left;
- ``fakehub``: a fake Hugging Face Hub that the real ``huggingface_hub`` client talks to over HTTP;
- ``faults``: the fault-injection harness (kill the workflow, resume it, compare with a clean run);
- ``slurm_cluster``: a real single-node SLURM cluster started for a test session.

Fixtures stay in ``tests/conftest.py``.
"""
