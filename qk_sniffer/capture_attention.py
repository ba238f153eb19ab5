"""The capture attention function, registered with transformers' ``AttentionInterface``.

``register_capture_attention(inner)`` registers ``qk_sniffer_<inner>``: an attention function
that sees the queries and keys every layer hands to attention (post-RoPE, and after anything
the model does after the rotation), gives them to the active sniffer
(:func:`qk_sniffer.capture.get_active_sniffer`) and then calls the real implementation (sdpa,
eager, flash, ...). Its mask function is registered under the same name, or transformers would
pass no mask at all. transformers is imported when a function is registered, not when this
module is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .capture import get_active_sniffer
from .errors import UnsupportedModelError

CAPTURE_PREFIX = "qk_sniffer_"

_EAGER_CACHE: dict[type, Callable] = {}


def _eager_for(module) -> Callable:
    """The ``eager_attention_forward`` of ``module``'s own modeling module (cached per class)."""
    fn = _EAGER_CACHE.get(type(module))
    if fn is None:
        mod = sys.modules[type(module).__module__]
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(
                f"{type(module).__name__}: its modeling module has no eager_attention_forward; "
                "use model.attn_implementation: sdpa"
            )
        _EAGER_CACHE[type(module)] = fn
    return fn


def _make_capture_attention(inner: str) -> Callable:
    """The attention function that hands q/k to the active sniffer, then runs ``inner``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        active = get_active_sniffer()
        if active is not None:
            active.on_attention(module, query, key, kwargs.get("sliding_window", getattr(module, "sliding_window", None)))
        fn = _eager_for(module) if inner == "eager" else ALL_ATTENTION_FUNCTIONS[inner]
        return fn(module, query, key, value, attention_mask, **kwargs)

    capture_attention.__name__ = f"{CAPTURE_PREFIX}{inner}"
    return capture_attention


def register_capture_attention(inner: str = "sdpa") -> str:
    """Register ``qk_sniffer_<inner>`` (attention and mask function); return the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner.startswith(CAPTURE_PREFIX):
        inner = inner[len(CAPTURE_PREFIX):]
    if inner != "eager" and inner not in ALL_ATTENTION_FUNCTIONS:
        known = ", ".join(["eager", *ALL_ATTENTION_FUNCTIONS.keys()])
        raise UnsupportedModelError(
            f"model.attn_implementation: {inner!r} is not available here (known: {known}); "
            "install its package (e.g. flash-attn) or choose sdpa"
        )
    if inner not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise UnsupportedModelError(f"model.attn_implementation: {inner!r} has no mask function in transformers")
    name = f"{CAPTURE_PREFIX}{inner}"
    AttentionInterface.register(name, _make_capture_attention(inner))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name
