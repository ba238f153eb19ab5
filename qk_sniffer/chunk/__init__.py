"""One ``sniff_chunk`` job: which examples a chunk holds and whether it runs, and running the model over them.

The modules, each importing only those listed before it (and leaf modules of the package):

- :mod:`.plan`: the chunk layout and rerun decisions, from what the data root records (manifests, plan files).
- :mod:`.source`: reading a chunk's examples from the dataset (its shard), tokenizing them, length-sorted batches.
- :mod:`.tokens`: a token cache shared by the members of a sweep that read the same examples.
- :mod:`.writer`: the row schema and the writer that turns captured batches into Parquet files off the main thread.
- :mod:`.checkpoints`: the chunk's checkpoint journal (finished segments), resume, and assembling its files.
- :mod:`.gpu`: leases of GPU slots shared by the jobs of one machine.
- :mod:`.run`: ``sniff-chunk`` itself (:func:`~qk_sniffer.chunk.run.run_chunk`), writing the manifest last.

Nothing is imported here, so that the planning and the row schema (used by merge, verify and the preflight)
come without torch and the model code; import from the modules.
"""
