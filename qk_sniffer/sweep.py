"""Sweeps: several configs, or the ``sweep:`` entries of one, run as one workflow (one Snakemake DAG).

A *member* is one complete, validated config: one model (and revision) captured into one split. A *dataset
root* is the data root whose ``final/`` mirrors one remote (a branch of a Hub repo, a remote directory, or none);
the members that share it are one dataset. Its pull, merge, card, verification, push and report run once for all
of them (:mod:`qk_sniffer.sweep_stages`); its chunks run per member, all members' chunks scheduled together.

Where a member's files go (its *member root*, the ``output.data_root`` of its effective config):

- the first member of a dataset root uses the dataset root itself, exactly as if its config ran alone;
- every further member stages under ``<dataset root>/members/<split>/`` (``staging/``, ``logs/``,
  ``.qk-sniffer/``), whose ``final`` is a relative symbolic link to the dataset root's ``final/``: every stage
  then works on the member as on any data root, and the merged rows land in the one shared dataset;
- members whose configs name one data root but publish to different branches of one Hub repo get one dataset root
  per branch, ``<data root>/<branch>`` (the original tool's configs share ``data_root: data`` and differ by branch).

Refused, with one line naming both members and the fix: two members writing one split into one dataset root, or
publishing one split to the same branch (or remote directory); one data root asked to mirror different repos.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import ConfigError, chunk_fingerprint, data_root, load_schema, split_name, tokenizer_name, validate_config
from .effective_config import EFFECTIVE_CONFIG, write_effective_config
from .layout import write_text_if_changed

TOKENS_SIDECAR = Path(".qk-sniffer") / "tokens.json"
TOKEN_CACHE = Path(".qk-sniffer") / "tokens"  # relative to the working directory of the workflow
MEMBERS_DIR = "members"
# names a branch sub-root must not take: they are what a data root holds itself
RESERVED = {"final", "staging", "logs", "report", MEMBERS_DIR, ".qk-sniffer"}


@dataclass
class Member:
    label: str  # where the member comes from, for messages: "config file a.yaml, sweep entry 2"
    cfg: dict  # validated; output.data_root is ``root`` when that differs from what the config says
    split: str
    root: str  # member root, spelled as Snakemake paths are (relative to the working directory unless absolute)
    dataset: str  # dataset root
    remote: tuple | None
    shares_tokens: bool = False
    chunks: list = field(default_factory=list)  # ChunkSpec of every planned chunk (the preflight sets them)

    @property
    def config_path(self) -> str:
        """The effective config the rules pass to ``python -m qk_sniffer``."""
        return (Path(self.root) / EFFECTIVE_CONFIG).as_posix()

    @property
    def gpus(self) -> int:
        return 0 if self.cfg["inference"]["device"] == "cpu" else int(self.cfg["workflow"]["gpus_per_chunk"])

    @property
    def fingerprint(self) -> str:
        return chunk_fingerprint(self.cfg)

    def manifests(self) -> list[str]:
        return [(Path(self.root) / f"staging/chunk-{s.chunk}/manifest.json").as_posix() for s in self.chunks]


@dataclass
class Plan:
    members: list[Member]
    datasets: dict[str, list[Member]] = field(default_factory=dict)  # dataset root -> its members, in order

    def __post_init__(self):
        for m in self.members:
            self.datasets.setdefault(m.dataset, []).append(m)
        self._by_root = {m.root: m for m in self.members}

    def member(self, root: str) -> Member:
        return self._by_root[root]

    def configs(self, dataset: str) -> str | list[str]:
        """The config argument of a dataset's stage commands: one path, or one per member (sharing the dataset)."""
        paths = [m.config_path for m in self.datasets[dataset]]
        return paths[0] if len(paths) == 1 else paths

    def manifests(self, dataset: str) -> list[str]:
        return [p for m in self.datasets[dataset] for p in m.manifests()]

    def remote(self, dataset: str) -> dict:
        out = self.datasets[dataset][0].cfg["output"]
        return {k: out[k] for k in ("hf_repo_id", "hf_branch", "remote_dir")}


# -- expanding configs into members -----------------------------------------------------------------------


def _object_schema(node: dict, schema: dict) -> dict | None:
    """The schema of a mapping with keys of its own (after $ref and anyOf), else None."""
    ref = node.get("$ref")
    if ref:
        target = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    for option in node.get("anyOf", ()):
        if option.get("type") == "object":
            node = {**node, **option}
    return node if node.get("properties") else None


def apply_override(base: dict, override: dict, node: dict | None = None, schema: dict | None = None) -> dict:
    """``base`` with ``override`` applied: mappings the schema gives keys of their own are merged key by key,
    every other value (a list, a value mapping such as ``model.config_overrides``) replaces the base's."""
    schema = schema if schema is not None else load_schema()
    node = node if node is not None else schema
    out = copy.deepcopy(base)
    for key, value in override.items():
        sub = _object_schema((node.get("properties") or {}).get(key, {}), schema)
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = apply_override(out[key], value, sub, schema)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand(raw: dict | None, source: str, overrides: dict | None = None) -> list[tuple[str, dict]]:
    """The members of one config: itself, or one per ``sweep:`` entry; each ``(label, validated config)``.

    ``overrides`` (snakemake's ``--config KEY=VALUE``) apply to every member, last.
    """
    schema = load_schema()
    overrides = overrides or {}
    validate_config(raw, source=source)  # the base and the shape of its sweep, with the usual messages
    entries = raw.get("sweep")
    base = {k: v for k, v in raw.items() if k != "sweep"}
    if not entries:
        return [(source, validate_config(apply_override(base, overrides, schema=schema), source=source))]
    out = []
    for i, entry in enumerate(entries, 1):
        label = f"{source}, sweep entry {i}"
        if "sweep" in entry:
            raise ConfigError(f"{label}: sweep: an entry cannot hold a sweep of its own; list every member in the "
                              "top-level sweep")
        member = apply_override(apply_override(base, entry, schema=schema), overrides, schema=schema)
        out.append((label, validate_config(member, source=label)))
    return out


def config_paths(patterns: list[str]) -> list[str]:
    """``--config`` values: paths, or globs (quoted, so the shell left them alone) expanded in sorted order."""
    out: list[str] = []
    for pat in patterns:
        if Path(pat).exists() or not glob.has_magic(pat):
            out.append(pat)
            continue
        found = sorted(glob.glob(pat))
        if not found:
            raise ConfigError(f"--config: no file matches {pat!r}; pass config files or a glob that matches some")
        out += found
    return out


def read_raw(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML config (see config/README.md).")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc


def plan_files(paths: list[str | Path], overrides: dict | None = None) -> Plan:
    """The plan of the config files ``paths`` (each one member, or its sweep's members)."""
    members = [m for p in paths for m in expand(read_raw(p), f"config file {p}", overrides)]
    return plan(members)


# -- roots and conflicts ----------------------------------------------------------------------------------


def remote_of(cfg: dict) -> tuple | None:
    out = cfg["output"]
    if out.get("remote_dir") and out.get("hf_repo_id"):
        raise ConfigError("output.remote_dir and output.hf_repo_id are both set; a run pushes to one remote: "
                          "remove one of them")
    if out.get("hf_repo_id"):
        return ("hub", out["hf_repo_id"], out.get("hf_branch") or "main")
    if out.get("remote_dir"):
        return ("dir", os.path.abspath(out["remote_dir"]))
    return None


def describe_remote(remote: tuple | None) -> str:
    if remote is None:
        return "no remote"
    if remote[0] == "hub":
        return f"branch {remote[2]!r} of Hub repo {remote[1]}"
    return f"remote_dir {remote[1]}"


def _spelled(path: Path | str) -> str:
    """A root as the rules write it (relative stays relative; ``./`` and ``a/../`` folded)."""
    return Path(os.path.normpath(str(path))).as_posix()


def _grouped(items, key) -> dict:
    out: dict = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out


def _branch_dir(branch: str) -> str:
    return re.sub(r"[^\w.-]", "_", branch)


def _dataset_roots(members: list[tuple[str, dict]]) -> list[str]:
    """The dataset root of each member: its data root, or ``<data root>/<branch>`` where one data root is asked
    to mirror several branches of one Hub repo."""
    roots = [_spelled(data_root(cfg)) for _, cfg in members]
    remotes = [remote_of(cfg) for _, cfg in members]
    out = list(roots)
    for idx in _grouped(range(len(members)), lambda i: os.path.abspath(roots[i])).values():
        kinds = list(dict.fromkeys(remotes[i] for i in idx))
        if len(kinds) == 1:
            continue
        hub = [r for r in kinds if r is not None and r[0] == "hub"]
        if len(hub) != len(kinds) or len({r[1] for r in hub}) > 1:
            a = next(i for i in idx if remotes[i] == kinds[0])
            b = next(i for i in idx if remotes[i] == kinds[1])
            raise ConfigError(
                f"output.data_root: {members[a][0]} and {members[b][0]} both use data root {roots[a]} but publish to "
                f"{describe_remote(kinds[0])} and {describe_remote(kinds[1])}; a data root mirrors one remote: give "
                "one of them its own output.data_root"
            )
        names = {r[2]: _branch_dir(r[2]) for r in hub}
        for branch, name in names.items():
            clash = [b for b, n in names.items() if n == name and b != branch]
            if name in RESERVED or clash:
                raise ConfigError(
                    f"output.hf_branch: branch {branch!r} would get the folder {roots[idx[0]]}/{name}, which "
                    + (f"branch {clash[0]!r} gets too" if clash else "a data root uses for itself")
                    + "; give these members their own output.data_root"
                )
        for i in idx:
            out[i] = _spelled(Path(roots[i]) / names[remotes[i][2]])
    return out


def _check_splits(members: list[Member]) -> None:
    for group in _grouped(members, lambda m: os.path.abspath(m.dataset)).values():
        remotes = list(dict.fromkeys(m.remote for m in group))
        if len(remotes) > 1:
            a, b = (next(m for m in group if m.remote == r) for r in remotes[:2])
            raise ConfigError(
                f"output.data_root: {a.label} and {b.label} both use data root {a.dataset} but publish to "
                f"{describe_remote(a.remote)} and {describe_remote(b.remote)}; give one of them its own "
                "output.data_root"
            )
    seen: dict[tuple, Member] = {}
    for m in members:
        for key in (("root", os.path.abspath(m.dataset), m.split), ("remote", m.remote, m.split)):
            if key[1] is None:
                continue
            other = seen.setdefault(key, m)
            if other is m:
                continue
            where = f"data root {m.dataset}" if key[0] == "root" else describe_remote(m.remote)
            raise ConfigError(
                f"output.split_name: {other.label} and {m.label} both write split {m.split!r} into {where}; give one "
                "of them another output.split_name (the split defaults to model.name with every non-word character "
                "replaced by _, so revisions of one model need split names of their own)"
            )


def _token_group(cfg: dict) -> str:
    """What decides a chunk's tokens: the dataset, the tokenizer as the config names it, max_length, chunking."""
    tok = cfg["tokenizer"]
    own = tokenizer_name(cfg) == cfg["model"]["name"]
    remote_code = bool(tok.get("trust_remote_code") or (own and cfg["model"]["trust_remote_code"]))
    key = {"dataset": cfg["dataset"], "tokenizer": [tokenizer_name(cfg), tok.get("revision"), remote_code],
           "max_length": tok["max_length"],
           "chunking": [cfg["workflow"]["num_chunks"], cfg["workflow"].get("chunk_size")]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(members: list[tuple[str, dict]]) -> Plan:
    """Place every ``(label, validated config)`` (roots, see the module docstring) and check for conflicts."""
    if not members:
        raise ConfigError("no config given; pass --config PATH (or several)")
    if len(members) == 1:  # one config: everything exactly as it always was
        label, cfg = members[0]
        root = Path(data_root(cfg)).as_posix()
        return Plan([Member(label, cfg, split_name(cfg), root, root, remote_of(cfg))])
    datasets = _dataset_roots(members)
    spelling: dict[str, str] = {}  # one spelling per directory (a relative and an absolute path may name one)
    datasets = [spelling.setdefault(os.path.abspath(d), d) for d in datasets]
    placed: list[Member] = []
    for (label, cfg), dataset in zip(members, datasets):
        placed.append(Member(label, cfg, split_name(cfg), dataset, dataset, remote_of(cfg)))
    _check_splits(placed)
    first: dict[str, Member] = {}
    for m in placed:
        lead = first.setdefault(os.path.abspath(m.dataset), m)
        if lead is not m:
            m.root = _spelled(Path(m.dataset) / MEMBERS_DIR / m.split)
        if os.path.abspath(m.root) != os.path.abspath(data_root(m.cfg)):
            m.cfg = copy.deepcopy(m.cfg)
            m.cfg["output"]["data_root"] = m.root
    owners: dict[str, Member] = {}
    for m in placed:
        for path in {m.root, m.dataset}:
            other = owners.setdefault(os.path.abspath(path), m)
            if other.dataset != m.dataset:
                raise ConfigError(f"output.data_root: {other.label} and {m.label} both use {path} (one as a data "
                                  "root, one for a member of another); give them data roots apart")
    groups = _grouped(placed, lambda m: _token_group(m.cfg))
    for group in groups.values():
        for m in group:
            m.shares_tokens = len(group) > 1
    return Plan(placed)


# -- what the Snakefile writes before building the DAG ---------------------------------------------------


def link_final(member: Member) -> None:
    """``<member root>/final`` -> the dataset root's ``final/`` (relative, so a moved data root keeps working)."""
    target = Path(member.dataset) / "final"
    target.mkdir(parents=True, exist_ok=True)
    link = Path(member.root) / "final"
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    if link.exists() or link.is_symlink():
        raise ConfigError(f"{link} exists and is not a link to {target}; move it away (a sweep member keeps its "
                          "staged chunks there and shares its data root's final/)")
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(rel, target_is_directory=True)


def prepare(plan_: Plan, workdir: Path | None = None) -> None:
    """Write each member's effective config (only when it changed), its tokens sidecar and its ``final`` link."""
    cache = (Path(workdir) if workdir is not None else Path.cwd()) / TOKEN_CACHE
    for m in plan_.members:
        write_effective_config(m.cfg, Path(m.root))
        sidecar = Path(m.root) / TOKENS_SIDECAR
        if m.shares_tokens:
            write_text_if_changed(sidecar, json.dumps({"cache": str(cache.absolute())}, indent=2) + "\n")
        else:
            sidecar.unlink(missing_ok=True)
        if m.root != m.dataset:
            link_final(m)


def plan_workflow(configfiles: list, default: dict, overrides: dict | None) -> Plan:
    """The plan of a ``snakemake`` invocation: every ``--configfile`` is a member (or its sweep's members); without
    any, ``default`` (the embedded demo config, overrides already applied)."""
    if configfiles:
        return plan_files([str(p) for p in configfiles], dict(overrides or {}))
    return plan(expand(copy.deepcopy(default), "config (config/config.yaml)"))
