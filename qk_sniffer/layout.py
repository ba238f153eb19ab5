"""Paths and names of the data root (README.md, "What you get")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path

from .errors import QkSnifferError

CONFIG_RE = re.compile(r"^l(\d{2,})h(\d{2,})([qk])$")


def config_name(layer: int, head: int, kind: str, n_layers: int = 0, n_heads: int = 0) -> str:
    """``lLLhHH`` + q/k, two digits at least, three where the model has more than 99 layers/heads."""
    lw = max(2, len(str(max(n_layers - 1, 0))))
    hw = max(2, len(str(max(n_heads - 1, 0))))
    return f"l{layer:0{lw}d}h{head:0{hw}d}{kind}"


def parse_config_name(name: str) -> tuple[int, int, str] | None:
    m = CONFIG_RE.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3)


def final_dir(root: Path) -> Path:
    return Path(root) / "final"


def staging_dir(root: Path) -> Path:
    return Path(root) / "staging"


def chunk_dir(root: Path, chunk: int) -> Path:
    return staging_dir(root) / f"chunk-{chunk}"


def manifest_path(root: Path, chunk: int) -> Path:
    return chunk_dir(root, chunk) / "manifest.json"


def data_file(base: Path, split: str, config: str) -> Path:
    """``<base>/data/<split>/<config>/data.parquet`` (same shape in staging chunks and final/)."""
    return Path(base) / "data" / split / config / "data.parquet"


class DiskFullError(QkSnifferError, OSError, RuntimeError):
    """A write ran out of room: no space left on the filesystem (ENOSPC) or the user's quota spent (EDQUOT).

    One line naming the file that was being written, what was left as it was, and what to do
    (``hint``); an ``OSError`` with the original ``errno``, so handlers of ``OSError`` still see it
    (and a ``RuntimeError``, which the chunk writer raised for it before).
    """

    def __init__(self, path, code: int = errno.ENOSPC, hint: str = ""):
        super().__init__(code, os.strerror(code), str(path))
        self.path = Path(path)
        self.hint = hint

    def __str__(self) -> str:
        return f"{os.strerror(self.errno or errno.ENOSPC)} writing {self.path}" + (f": {self.hint}" if self.hint else "")


_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full_errno(exc: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when ``exc`` (or an exception it was raised from or during) is a full disk or quota, else
    None. pyarrow's errors of its own file writes carry the errno too."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb"):
    """Open a temporary file next to ``path``; on success fsync it and rename it into place.

    On any error the temporary file is removed and ``path`` is left as it was; a full disk (or quota)
    raises :class:`DiskFullError` naming ``path``. The file gets the usual permissions (0666 less the
    umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        code = None if isinstance(exc, DiskFullError) else disk_full_errno(exc)
        if code is not None:
            raise DiskFullError(path, code, f"{path.name} was left as it was; free space there and run this "
                                            "step again") from exc
        raise


# what atomic_output leaves behind when its process is killed: .<name>.<8 random characters>.tmp
_STALE_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_stale_temps(base: Path) -> list[Path]:
    """Delete the temporary files of interrupted atomic writes under ``base``; returns them.

    Only for a directory that one stage writes at a time (the workflow runs the stages writing
    ``final/`` one after the other), called before that stage writes anything.
    """
    removed = []
    for p in sorted(Path(base).rglob(".*.tmp")) if Path(base).is_dir() else []:
        if _STALE_TEMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it into place."""
    with atomic_output(path, "w") as fh:
        fh.write(text)


def write_text_if_changed(path: Path, text: str) -> bool:
    """:func:`atomic_write_text` unless ``path`` already holds ``text`` (its modification time then stays put);
    whether it wrote."""
    try:
        if Path(path).read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    atomic_write_text(path, text)
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
