"""Errors about the model that the user can act on (one clear line each)."""

from __future__ import annotations


class UnsupportedModelError(RuntimeError):
    """The model cannot be captured exactly; the message names the class and the way out."""
