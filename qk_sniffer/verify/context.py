"""What every check of a verification shares: the data root, its ``final/`` folder, the records read once
(``final/README.md``'s front matter and ``final/.merged.json``), the optional config, and the report that
problems and warnings are added to (each named by its path relative to the data root)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..front_matter import ReadmeError, read_front_matter
from ..layout import final_dir
from ..records import MergeRecord, RecordError, read_merge_record
from ..store import MERGED_NAME, card_splits
from .report import VerifyReport

SAMPLE_ROWS = 2000  # rows per file whose sampling decision is recomputed
REBUILD = ("rebuild it: delete it and rerun the chunks that produced it, then merge (or pull it from the remote "
           "again after deleting final/.snapshot.json)")


@dataclass
class VerifyContext:
    """One verification of the data root ``root``: what the checks read and the report they write to.

    ``cfg`` is the validated config passed in (or None); ``sample_rows`` bounds the rows per file whose
    sampling decision is recomputed (None: all). ``front`` and ``merged`` are filled by :meth:`load_records`.
    """

    root: Path
    cfg: dict | None = None
    sample_rows: int | None = SAMPLE_ROWS
    final: Path = field(init=False)
    report: VerifyReport = field(init=False)
    front: dict | None = field(default=None, init=False)  # README front matter when it parses
    merged: MergeRecord | None = field(default=None, init=False)  # final/.merged.json when it reads as one

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.final = final_dir(self.root)
        self.report = VerifyReport(root=self.root)

    # reporting
    def rel(self, path: Path) -> str:
        """``path`` relative to the data root (as problems name it), else as given."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def problem(self, path: Path | str, what: str) -> None:
        where = self.rel(path) if isinstance(path, Path) else path
        self.report.problems.append(f"{where}: {what}")

    def warn(self, path: Path | str, what: str) -> None:
        where = self.rel(path) if isinstance(path, Path) else path
        self.report.warnings.append(f"{where}: {what}")

    # the records
    def load_records(self) -> None:
        """Read the card's front matter and ``.merged.json`` once; a record that does not parse is a problem."""
        readme = self.final / "README.md"
        if readme.is_file():
            try:
                self.front, _ = read_front_matter(readme)
            except (ReadmeError, OSError, UnicodeDecodeError) as exc:
                self.problem(readme, f"cannot be read ({exc}); render it again (sniff-qk render-readme --config ...)")
        merged = self.final / MERGED_NAME
        if merged.is_file():
            try:
                self.merged = read_merge_record(merged)
            except RecordError as exc:
                self.problem(merged, f"{exc.what}; rerun merge to rewrite it")

    def split_meta(self, split: str) -> dict | None:
        """``qk_sniffer: splits: <split>:`` of the README front matter (run metadata), if recorded."""
        return card_splits(self.front).get(split)
