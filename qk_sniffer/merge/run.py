"""``merge-staging`` step by step: read and check the inputs, check every config's files, append or rewrite
each config under temporary names, write ``.merged.json``, then rename everything into place (or, on any
failure, remove what was written)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..layout import DiskFullError, atomic_write_json, disk_full_errno
from ..store import MERGED_NAME, final_configs
from .append import APPEND_WORKERS, append_config
from .inputs import MergeInputs, check_config, read_inputs
from .outputs import MergeOutputs
from .record import merge_record
from .rewrite import MERGE_WORKERS, rewrite_config

log = logging.getLogger("qk_sniffer")


def merge_staging(cfg: dict, root: Path | None = None, *, append: bool = True) -> dict:
    """Merge every complete staged chunk into ``final/``; write ``final/.merged.json`` and return what it holds
    (:class:`qk_sniffer.records.MergeRecord` as JSON).

    ``append=False`` rewrites every grown file even where appending would do (benchmarks and tests
    compare the two ways with it).
    """
    t0 = time.perf_counter()
    inputs = read_inputs(cfg, root)
    check_configs(inputs)
    # every file goes to a temporary name first: nothing is renamed into place before all are written
    outputs = MergeOutputs()
    try:
        record = merge_record(inputs, write_configs(inputs, outputs, append=append), t0)
        atomic_write_json(outputs.temp_for(inputs.final / MERGED_NAME), record.to_json())
    except BaseException as exc:
        outputs.rollback()
        code = disk_full_errno(exc)
        if code is None:
            raise
        where = exc.path if isinstance(exc, DiskFullError) else getattr(exc, "filename", None) or inputs.final
        raise DiskFullError(outputs.place_of(where), code, _full_hint(inputs)) from exc
    outputs.commit(inputs.final / MERGED_NAME)
    log.info("merged %d chunks into split %r: %d rows added to %d configs in %.1fs", len(inputs.chunks), inputs.split,
             record.rows_added_total, len(record.configs_touched), record.merge_s)
    return record.to_json()


def _pool_map(fn: Callable, names: list[str], workers: int) -> dict:
    """``{name: fn(name)}`` over ``names`` (in their order), at most ``workers`` at a time."""
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names))), thread_name_prefix="qk-merge") as pool:
        return dict(zip(names, pool.map(fn, names)))


def check_configs(inputs: MergeInputs) -> None:
    """Check every file before anything is written (a few configs at a time: mostly reading footers); fills in
    ``inputs.schemas`` and ``inputs.footers``."""
    checked = _pool_map(lambda name: check_config(inputs, name), sorted(inputs.staged), APPEND_WORKERS)
    for cfg_name, (schema, found) in checked.items():
        inputs.schemas[cfg_name] = schema
        inputs.footers.update(found)


def write_configs(inputs: MergeInputs, outputs: MergeOutputs, *, append: bool = True) -> dict[str, tuple]:
    """Append or rewrite every config with staged files, under temporary names in ``outputs``; returns what each
    returned, by config name. Appends (copying bytes, waiting on the disk) run several at a time, then the
    configs that could not be appended are rewritten (polars and pyarrow decode and encode without the GIL), at
    most ``MERGE_WORKERS`` at a time, for memory. ``append=False`` rewrites every config."""
    names = sorted(inputs.staged)
    if append:
        done = _pool_map(lambda name: append_config(inputs, outputs, name), names, APPEND_WORKERS)
    else:
        done = dict.fromkeys(names)
    rest = [n for n in names if done[n] is None]
    done.update(_pool_map(lambda name: rewrite_config(inputs, outputs, name), rest, MERGE_WORKERS))
    return done


def _full_hint(inputs: MergeInputs) -> str:
    """What a merge that found its disk full says after the path: what was kept, the room it needs, the way on."""
    final, staged = inputs.final, inputs.staged
    try:
        size = sum(p.stat().st_size for paths in staged.values() for p in paths)
        size += sum(p.stat().st_size for n, p in final_configs(final, inputs.split).items() if n in staged)
        need = f" (about {size / 2**20:,.1f} MiB here)"
    except OSError:
        need = ""
    return (f"final/ was left as it was, nothing of this merge was kept. A merge writes the new version of each file "
            f"it grows next to the old one before it replaces any{need}; free space there and run merge_staging again")
