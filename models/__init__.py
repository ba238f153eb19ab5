"""Model-family knowledge for qk-sniffer: adapters, patched modeling files, tiny test checkpoints.

``models/<name>/modeling_<name>.py`` files dropped here are aliased into
``transformers.models.<name>`` by :func:`qk_sniffer.patch_modeling_modules`.
"""
