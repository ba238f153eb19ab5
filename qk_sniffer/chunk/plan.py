"""Which examples each chunk holds, and which chunks must run again, decided by what the data root records.

A chunk is a contiguous range of examples ``[start, stop)`` of the split (after ``dataset.max_samples``). Its
range does not depend on ``max_samples``:

- a fresh member root divides its examples into ``workflow.num_chunks`` ranges whose sizes differ by at most
  one (or into blocks of ``workflow.chunk_size`` examples when that is set); the largest range is the root's
  *chunk size*;
- once chunks are recorded (their manifests, or the plan files of chunks that have not finished), their ranges
  stay where they are: examples added later (a larger ``max_samples``, a grown source) get new chunks of the
  recorded chunk size after the last recorded range, so extending a dataset runs only the new examples, and
  the merge appends their rows. A smaller ``max_samples`` ends the plan at the chunk that holds the new end
  (published rows are never removed). Setting ``workflow.chunk_size`` to another size than the recorded one
  divides the examples again from the start;
- a stream of unknown length without ``max_samples`` is one chunk read to its end.

A chunk reruns when its manifest is missing, records another *fingerprint* (a hash of every setting that
changes the rows of a range: :func:`qk_sniffer.config.chunk_fingerprint`) or another range. The decision is
taken from ``<member root>/staging/chunk-N/manifest.json`` alone, so it is the same from any working directory,
with or without Snakemake's own records, and after the data root was copied or moved. It reaches Snakemake
through one *plan file* per chunk, ``<member root>/.qk-sniffer/chunks/chunk-N.json`` (the chunk's range and
fingerprint, the input of its ``sniff_chunk`` job): it is made older than the manifest when the chunk is up to
date and newer when it must run again, so Snakemake's own modification-time rule reruns exactly those chunks.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import ConfigError, chunk_fingerprint, fingerprint_inputs, legacy_chunk_fingerprint
from ..layout import manifest_path, staging_dir, write_text_if_changed
from ..records import ChunkManifest, RecordError, read_manifest

PLANS_DIR = Path(".qk-sniffer") / "chunks"
PLAN_FORMAT = 1


@dataclass(frozen=True)
class ChunkSpec:
    """What one ``sniff_chunk`` job computes: examples ``[start, stop)`` under one fingerprint."""

    chunk: int
    start: int
    stop: int | None  # None: a stream of unknown length, read to its end
    chunk_size: int | None
    fingerprint: str

    @property
    def example_range(self) -> list:
        return [self.start, self.stop]

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> ChunkSpec:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{k: raw[k] for k in ("chunk", "start", "stop", "chunk_size", "fingerprint")})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"chunk plan {path} is not readable ({exc}); rerun snakemake (it writes the plan "
                              "files before any chunk job)") from exc


@dataclass
class Decision:
    spec: ChunkSpec
    runs: bool
    why: str  # for a chunk that runs: why; else "up to date"


@dataclass
class MemberChunks:
    """The chunks of one member root: their specs and what this run does with each."""

    root: Path
    chunk_size: int | None
    decisions: list[Decision] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each: how the layout was chosen

    @property
    def specs(self) -> list[ChunkSpec]:
        return [d.spec for d in self.decisions]

    def summary(self) -> list[str]:
        """Lines for the user: one per chunk that runs, and a count of those that do not."""
        runs = [d for d in self.decisions if d.runs]
        head = (f"{self.root.as_posix()}: {len(self.decisions)} chunk(s) of up to {self.chunk_size or 'all'} "
                f"examples; {len(runs)} to run, {len(self.decisions) - len(runs)} up to date")
        return [head, *self.notes, *(f"  chunk {d.spec.chunk} {_range(d.spec)} runs: {d.why}" for d in runs)]


def _range(spec: ChunkSpec) -> str:
    return f"[{spec.start}, {'end' if spec.stop is None else spec.stop})"


def plan_path(root: Path, chunk: int) -> Path:
    return Path(root) / PLANS_DIR / f"chunk-{chunk}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _manifest(root: Path, chunk: int) -> tuple[ChunkManifest | None, str | None]:
    """Chunk ``chunk``'s manifest (None when it has none), and why one that is there cannot be read."""
    path = manifest_path(root, chunk)
    if not path.is_file():
        return None, None
    try:
        return read_manifest(path), None
    except RecordError as exc:
        return None, str(exc)


def _chunk_indices(root: Path) -> set[int]:
    found = set()
    for base, prefix in ((staging_dir(root), "chunk-"), (Path(root) / PLANS_DIR, "chunk-")):
        if base.is_dir():
            for p in base.iterdir():
                stem = p.name.removesuffix(".json")
                if stem.startswith(prefix) and stem[len(prefix):].isdigit():
                    found.add(int(stem[len(prefix):]))
    return found


def recorded_layout(root: Path) -> tuple[list[tuple[int, int | None]], int | None]:
    """The ranges the member root records for chunks 0, 1, ... (while they tile the examples from 0) and its
    chunk size: a chunk's manifest is its record; a chunk that has not finished is recorded by its plan file."""
    ranges: list[tuple[int, int | None]] = []
    size = None
    started = False  # plan files alone are a plan, not data: they count once some chunk has started
    for k in sorted(_chunk_indices(root)):
        if k != len(ranges):
            break
        man, _ = _manifest(root, k)
        started = started or (staging_dir(root) / f"chunk-{k}").is_dir()
        if man is not None and man.example_range is not None:
            (start, stop), recorded_size = man.example_range, man.chunk_size
        else:
            plan = _read_json(plan_path(root, k))  # a chunk that has not finished: its plan file
            if plan is None:
                break
            start, stop, recorded_size = plan.get("start"), plan.get("stop"), plan.get("chunk_size")
        if start != (ranges[-1][1] if ranges else 0) or not isinstance(start, int):
            break
        ranges.append((start, stop))
        size = recorded_size or size
        if stop is None:
            break
    if not started:
        return [], None
    if ranges and size is None:  # manifests written before the chunk size was recorded
        size = max((b - a for a, b in ranges if b is not None), default=None) or None
    return ranges, size


def _balanced(total: int, n: int) -> list[tuple[int, int]]:
    return [(k * total // n, (k + 1) * total // n) for k in range(n)]


def _blocks(start: int, total: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, total)) for a in range(start, total, size)]


def layout(total: int | None, num_chunks: int, chunk_size: int | None,
           recorded: list[tuple[int, int | None]], recorded_size: int | None) -> tuple[list[tuple], int | None, str]:
    """The chunk ranges of ``total`` examples (None: unknown length) and the chunk size; with a note on the choice.

    ``chunk_size`` is ``workflow.chunk_size`` (None when unset); ``recorded`` what :func:`recorded_layout` found.
    """
    if total is None:
        if num_chunks > 1 or (chunk_size is not None):
            raise ConfigError("dataset.streaming: the length of the stream is not known in advance, so it cannot be "
                              "divided into chunks; set dataset.max_samples (or workflow.num_chunks: 1)")
        return [(0, None)], None, ""
    if recorded and recorded[-1][1] is None:
        recorded = []  # a whole-stream chunk of unknown length: divide again now that the length is known
    note = ""
    if chunk_size is not None and recorded and recorded_size != chunk_size:
        note = (f"  workflow.chunk_size {chunk_size} differs from the recorded chunk size {recorded_size}: "
                "the examples are divided again")
        recorded = []
    if not recorded:
        if chunk_size is not None:
            return _blocks(0, total, chunk_size) or [(0, 0)], chunk_size, note
        ranges = _balanced(total, num_chunks)
        return ranges, max((b - a for a, b in ranges), default=0) or None, note
    size = chunk_size or recorded_size or 1
    kept: list[tuple[int, int]] = []
    for a, b in recorded:
        if a >= total and kept:
            break
        kept.append((a, min(b, total)))
    end = kept[-1][1]
    ranges = kept + _blocks(end, total, size)
    if chunk_size is None and len(ranges) != num_chunks and not note:
        note = (f"  the recorded chunks hold up to {size} examples each, so {total} examples are {len(ranges)} "
                f"chunks (workflow.num_chunks={num_chunks} divides only a fresh data root; set "
                "workflow.chunk_size to divide again)")
    return ranges, size, note


def manifest_fingerprint_matches(manifest: ChunkManifest, cfg: dict) -> bool:
    """Whether a chunk manifest was produced under ``cfg``'s fingerprint (also as manifests written before the
    fingerprint left out max_samples and num_chunks record it)."""
    if manifest.config_fingerprint == chunk_fingerprint(cfg):
        return True
    if manifest.num_chunks is None:
        return False
    return manifest.config_fingerprint == legacy_chunk_fingerprint(cfg, manifest.dataset.get("max_samples"),
                                                                   manifest.num_chunks)


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def describe_config_change(manifest: ChunkManifest, cfg: dict) -> str:
    """What changed between the settings a manifest records and ``cfg`` (the settings that change rows)."""
    before = manifest.fingerprint_inputs
    if before is None:
        return f"the config changed (fingerprint {manifest.config_fingerprint} -> {chunk_fingerprint(cfg)})"
    a, b = _flat(before), _flat(json.loads(json.dumps(fingerprint_inputs(cfg), default=str)))
    changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not changed:
        return f"the config changed (fingerprint {manifest.config_fingerprint} -> {chunk_fingerprint(cfg)})"
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return "the config changed: " + "; ".join(changed[:3]) + more


def decide(cfg: dict, root: Path, total: int | None) -> MemberChunks:
    """The chunks of the member root ``root`` for ``total`` examples, and which of them run (module docstring)."""
    root = Path(root)
    recorded, recorded_size = recorded_layout(root)
    wf = cfg["workflow"]
    ranges, size, note = layout(total, int(wf["num_chunks"]), wf.get("chunk_size"), recorded, recorded_size)
    fingerprint = chunk_fingerprint(cfg)
    out = MemberChunks(root=root, chunk_size=size, notes=[note] if note else [])
    for k, (a, b) in enumerate(ranges):
        spec = ChunkSpec(chunk=k, start=a, stop=b, chunk_size=size, fingerprint=fingerprint)
        man, unreadable = _manifest(root, k)
        if man is None:
            progress = (staging_dir(root) / f"chunk-{k}" / "progress.json").is_file()
            why = "it resumes from its last checkpoint" if progress else "it has not run yet"
            out.decisions.append(Decision(spec, True, f"its manifest cannot be read ({unreadable})" if unreadable else why))
        elif not manifest_fingerprint_matches(man, cfg):
            out.decisions.append(Decision(spec, True, describe_config_change(man, cfg)))
        elif not _same_range(man.example_range, a, b):
            was = man.example_range or [None, None]
            out.decisions.append(Decision(spec, True, f"its examples change from [{was[0]}, {was[1]}) to "
                                                      f"{_range(spec)}"))
        else:
            out.decisions.append(Decision(spec, False, "up to date"))
    return out


def _same_range(recorded, start: int, stop: int | None) -> bool:
    """A manifest's example range against a planned one (a whole stream of unknown length records where it ended)."""
    if not isinstance(recorded, list) or len(recorded) != 2:
        return False
    return recorded[0] == start and (stop is None or recorded[1] == stop)


def plan_chunk(cfg: dict, chunk: int, root: Path) -> ChunkSpec:
    """Chunk ``chunk``'s spec planned here (a ``sniff-chunk`` run outside the workflow): the same decision the
    workflow takes, with its plan files written so later chunks see the same layout."""
    from .source import count_examples

    chunks = decide(cfg, root, count_examples(cfg))
    write_plans(chunks)
    if not 0 <= chunk < len(chunks.decisions):
        raise ConfigError(f"--chunk: {chunk} is not a chunk of {Path(root).as_posix()}: its examples are "
                          f"{len(chunks.decisions)} chunk(s), 0..{len(chunks.decisions) - 1}")
    return chunks.decisions[chunk].spec


def write_plans(chunks: MemberChunks) -> None:
    """Write each chunk's plan file (only when its content changes) and set its modification time so that
    Snakemake reruns exactly the chunks :func:`decide` says run; remove plan files of chunks no longer planned."""
    planned = set()
    for d in chunks.decisions:
        path = plan_path(chunks.root, d.spec.chunk)
        planned.add(path.name)
        same = not write_text_if_changed(path, d.spec.to_json())
        try:
            done = manifest_path(chunks.root, d.spec.chunk).stat().st_mtime
        except OSError:
            continue  # no manifest: the job runs because its output is missing
        if same and (path.stat().st_mtime < done) == (not d.runs):
            continue  # already says so: an up-to-date run leaves the data root exactly as it was
        when = done - 2 if not d.runs else max(time.time(), done + 2)
        os.utime(path, (when, when))
    base = Path(chunks.root) / PLANS_DIR
    if base.is_dir():
        for p in base.glob("chunk-*.json"):
            if p.name not in planned:
                p.unlink(missing_ok=True)


def read_plans(root: Path) -> list[ChunkSpec]:
    """The chunk plan files of a member root, in chunk order (what a job started by a cluster executor sees)."""
    base = Path(root) / PLANS_DIR
    specs = [ChunkSpec.read(p) for p in base.glob("chunk-*.json")] if base.is_dir() else []
    return sorted(specs, key=lambda s: s.chunk)
