"""qk-sniffer: capture sampled query/key vectors from Hugging Face causal LMs into Parquet datasets."""

__version__ = "0.1.0"

from .capture import (  # noqa: E402
    Sniffer,
    compute_positions,
    get_active_sniffer,
    register_capture_attention,
    set_active_example_ids,
)
from .modeling import patch_modeling_modules  # noqa: E402

__all__ = [
    "Sniffer",
    "compute_positions",
    "get_active_sniffer",
    "patch_modeling_modules",
    "register_capture_attention",
    "set_active_example_ids",
]
