"""The error of ``sniff-qk migrate`` and the tail of its messages (every refusal changes nothing)."""

from __future__ import annotations

from ..errors import QkSnifferError

NOTHING = "nothing was migrated"


class MigrateError(QkSnifferError, ValueError):
    """The source cannot be migrated (or not into this data root); one line, and nothing was changed."""
