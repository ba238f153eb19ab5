"""What a verification found: :class:`VerifyReport` (problems, warnings, counts) and its wording helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

NAMED = 3  # file names or keys quoted per problem line


@dataclass
class VerifyReport:
    """What :func:`verify` found: ``problems`` make ``ok`` false; ``warnings`` do not."""

    root: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: dict = field(default_factory=lambda: {
        "splits": 0, "configs": 0, "files": 0, "rows": 0, "chunks": 0, "staged_files": 0, "sampled_rows": 0,
    })

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        c = self.checked
        state = "OK" if self.ok else "FAILED"
        counts = (f"{c['splits']} split(s), {c['configs']} config(s), {c['files']} file(s), {c['rows']:,} rows, "
                  f"{c['chunks']} staged chunk(s) with {c['staged_files']} file(s); sampling decision of "
                  f"{c['sampled_rows']:,} rows recomputed")
        return (f"verify {self.root}: {state}: {len(self.problems)} problem(s), {len(self.warnings)} warning(s) "
                f"({counts})")

    def format(self) -> str:
        lines = [self.summary()]
        if self.problems:
            lines += ["problems:"] + [f"  - {p}" for p in self.problems]
        if self.warnings:
            lines += ["warnings:"] + [f"  - {w}" for w in self.warnings]
        return "\n".join(lines)


def named(items, n: int = NAMED) -> str:
    """The first ``n`` items, comma-separated, and how many more there are (a problem line stays short)."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
