"""The front matter of a dataset card (``final/README.md``): the YAML mapping between the ``---`` lines that open it.

A leaf module: the card's writer (:mod:`qk_sniffer.card`) and every reader of its per-split records (merge,
report, verify, migrate, legacy) import it, and it imports nothing of the package. The parsing is kept here rather
than in ``huggingface_hub``'s card helpers because a malformed card must fail with one line that names the file
and the fix, and an unclosed ``---`` must not be read as a card without front matter.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import QkSnifferError


class ReadmeError(QkSnifferError, ValueError):
    """The existing dataset card cannot be read; the message names the file and the fix."""


def split_front_matter(text: str, source: str = "README.md") -> tuple[dict, str]:
    """``(front matter mapping, body)``; a card without front matter gives ``({}, text)``."""
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        return {}, text
    for i in range(1, len(lines)):
        if lines[i].rstrip() == "---":
            head, body = "\n".join(lines[1:i]), "\n".join(lines[i + 1:])
            break
    else:
        raise ReadmeError(f"{source}: the front matter opened by '---' on line 1 is never closed by a '---' line; "
                          "fix or delete the file and render it again")
    try:
        data = yaml.safe_load(head) if head.strip() else {}
    except yaml.YAMLError as exc:
        raise ReadmeError(f"{source}: the YAML front matter is invalid ({exc}); fix or delete the file and render "
                          "it again") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ReadmeError(f"{source}: the front matter must be a YAML mapping, got {type(data).__name__}")
    return data, body


def read_front_matter(path: Path) -> tuple[dict, str]:
    """:func:`split_front_matter` of the card at ``path``."""
    return split_front_matter(Path(path).read_text(encoding="utf-8"), str(path))
