"""The files one merge writes, kept under temporary names until every one of them is written (all or nothing)."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path


class MergeOutputs:
    """The files one merge writes: each under a temporary name next to its place (the pattern
    ``remove_stale_temps`` clears after a kill), renamed into place together by :meth:`commit` once all of them
    are written, or removed together by :meth:`rollback` (with the directories made for them)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.files: dict[Path, Path] = {}  # place -> temporary name
        self.dirs: list[Path] = []  # directories made for new configs

    def temp_for(self, path: Path) -> Path:
        """The temporary name ``path`` is written under (reserved now; the same one when asked again)."""
        path = Path(path)
        with self._lock:
            if path in self.files:  # an append that fell back to a rewrite: the same temporary
                return self.files[path]
            d = path.parent
            while not d.exists():
                self.dirs.append(d)
                d = d.parent
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)  # a placeholder: the writers put their file there by a rename of their own
            self.files[path] = Path(tmp)
        return Path(tmp)

    def discard(self, path: Path) -> None:
        """Forget (and remove) the temporary of ``path``: nothing will be put in its place."""
        with self._lock:
            tmp = self.files.pop(Path(path), None)
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def place_of(self, path: Path) -> Path:
        """The place a temporary (or the temporary of a temporary) stands for; ``path`` itself otherwise."""
        for place, tmp in self.files.items():
            if Path(path) == tmp or Path(path).name.startswith(f".{tmp.name}."):
                return place
        return Path(path)

    def commit(self, last: Path) -> None:
        """Rename every file into place, ``last`` last."""
        for place, tmp in self.files.items():
            if place != last:
                os.replace(tmp, place)
        if last in self.files:
            os.replace(self.files[last], last)

    def rollback(self) -> None:
        """Remove every temporary, and the directories made for them (deepest first)."""
        for tmp in self.files.values():
            tmp.unlink(missing_ok=True)
        for d in sorted(set(self.dirs), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass

