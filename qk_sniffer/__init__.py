"""qk-sniffer: capture sampled query/key vectors from Hugging Face causal LMs into Parquet datasets.

The public names are imported lazily, so ``sniff-qk --help`` and every Snakefile parse do not pay
for importing torch and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Sniffer": "capture",
    "compute_positions": "capture",
    "get_active_sniffer": "capture",
    "register_capture_attention": "capture_attention",
    "set_active_example_ids": "capture",
    "patch_modeling_modules": "modeling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qk_sniffer' has no attribute {name!r}")
