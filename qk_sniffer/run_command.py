"""``sniff-qk run``: the Snakemake command line a run becomes (the workflow, its profiles, cores and GPUs), running
it, and what a finished run prints (where the dataset is and how to load it)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import yaml

from .config import REPO_ROOT, ConfigError
from .layout import CONFIG_RE, final_dir

log = logging.getLogger("qk_sniffer")

SNAKEFILE = REPO_ROOT / "Snakefile"
DEFAULT_PROFILE = REPO_ROOT / "workflow" / "profiles" / "default"

DRY_FLAGS = {"-n", "--dry-run", "--dryrun", "--lint", "--list", "-l", "--list-rules", "--summary", "-S",
             "--detailed-summary", "-D", "--dag", "--rulegraph", "--filegraph", "--list-target-rules", "--lt",
             "--unlock", "--cleanup-metadata", "--cm", "--touch", "-t", "--delete-all-output", "--delete-temp-output",
             "--report", "--archive", "--version", "-v", "--help", "-h"}


def _has_opt(args: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in args for n in names)


def _cluster_executor(extra: list[str]) -> bool:
    """Whether the snakemake arguments (or a profile they name) pick an executor other than local."""
    for i, tok in enumerate(extra):
        value = tok.split("=", 1)[1] if "=" in tok else (extra[i + 1] if i + 1 < len(extra) else "")
        if tok.split("=", 1)[0] in ("--executor", "-e"):
            return value != "local"
        if tok.split("=", 1)[0] in ("--profile", "--workflow-profile"):
            prof = Path(value) / "config.yaml"
            if prof.is_file():
                data = yaml.safe_load(prof.read_text(encoding="utf-8")) or {}
                if str(data.get("executor", "local")) != "local":
                    return True
    return False


def snakemake_command(config_path: Path | list[Path], cfg: dict | list[dict], *, cores: str | None = None,
                      extra: list[str] | None = None, workdir: Path | None = None) -> list[str]:
    """The snakemake invocation ``run`` executes (exposed for tests and for printing with -n).

    Several config paths are the members of a sweep (one ``--configfile`` each; the Snakefile plans them
    together). ``--cores`` defaults to all local cores, but is left out under a cluster executor: there it
    would cap every submitted job's threads at the submitting host's core count.
    """
    paths = config_path if isinstance(config_path, list | tuple) else [config_path]
    cfgs = cfg if isinstance(cfg, list | tuple) else [cfg]
    extra = _resolve_profiles(list(extra or []))
    workdir = Path(workdir) if workdir is not None else Path.cwd()
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--configfile",
           *(str(Path(p).resolve()) for p in paths), "--directory", str(workdir)]
    if cores is not None or not _cluster_executor(extra):
        cmd += ["--cores", str(cores or "all")]
    user_profile = _has_opt(extra, "--profile", "--workflow-profile")
    if not user_profile and DEFAULT_PROFILE.is_dir():
        cmd += ["--workflow-profile", str(DEFAULT_PROFILE)]
    if not user_profile and not _has_opt(extra, "--resources", "--res", "--executor", "-e"):
        cmd += ["--resources", f"gpu={_sweep_gpu_budget(cfgs)}"]
    return cmd + extra


def _resolve_profiles(args: list[str]) -> list[str]:
    """Let ``--profile slurm`` name a profile shipped under workflow/profiles/ from any working directory."""
    out = list(args)
    for i, tok in enumerate(out):
        for opt in ("--profile", "--workflow-profile"):
            if tok == opt and i + 1 < len(out):
                j, value, fmt = i + 1, out[i + 1], "{}"
            elif tok.startswith(opt + "="):
                j, value, fmt = i, tok.split("=", 1)[1], opt + "={}"
            else:
                continue
            shipped = REPO_ROOT / "workflow" / "profiles" / value
            if value and not Path(value).exists() and "/" not in value and shipped.is_dir():
                out[j] = fmt.format(shipped)
    return out


def _gpu_budget(cfg: dict) -> int:
    """The ``gpu`` resource for a local run: the GPUs this machine shows, or no limit without any."""
    from .chunk.gpu import detect_gpus

    per = cfg["workflow"]["gpus_per_chunk"]
    n = len(detect_gpus())
    if n == 0 or per == 0 or cfg["inference"]["device"] == "cpu":
        if n == 0 and per > 0 and cfg["inference"]["device"] != "cpu":
            log.info("no GPU found: every chunk runs on the CPU")
        return max(per, 1) * cfg["workflow"]["num_chunks"]
    if n < per:
        raise ConfigError(f"workflow.gpus_per_chunk is {per} but this machine shows {n} GPU(s); lower it")
    return n


def _sweep_gpu_budget(cfgs: list[dict]) -> int:
    """The ``gpu`` resource of several members: the GPUs this machine shows, or, without any, no limit."""
    budgets = [_gpu_budget(c) for c in cfgs]  # each also checks gpus_per_chunk against the GPUs found
    if len(budgets) == 1:
        return budgets[0]
    on_gpu = [b for c, b in zip(cfgs, budgets) if _uses_gpu(c)]  # the GPUs found (CPU members hold gpu=0)
    return max(on_gpu) if on_gpu else sum(budgets)


def _uses_gpu(cfg: dict) -> bool:
    from .chunk.gpu import detect_gpus

    return cfg["workflow"]["gpus_per_chunk"] > 0 and cfg["inference"]["device"] != "cpu" and bool(detect_gpus())


def _example_config_name(final: Path, split: str) -> str:
    base = final / "data" / split
    names = sorted(p.name for p in base.iterdir() if p.is_dir() and CONFIG_RE.match(p.name)) if base.is_dir() else []
    return names[0] if names else "all"


def cmd_run(configs: list[str], cores: str, extra: list[str]) -> int:
    from .sweep import config_paths, plan_files

    paths = config_paths(configs)
    plan = plan_files(paths)  # every member validated, and no two writing one split, before snakemake starts
    if not SNAKEFILE.is_file():
        raise ConfigError(f"the workflow ({SNAKEFILE}) is not next to the package; install qk-sniffer from a "
                          "checkout with `pip install -e .`")
    cmd = snakemake_command([Path(p) for p in paths], [m.cfg for m in plan.members], cores=cores, extra=extra)
    log.info("running: %s", " ".join(cmd))
    rc = subprocess.call(cmd)
    roots = [Path(m.root) if Path(m.root).is_absolute() else Path.cwd() / m.root for m in plan.members]
    if rc != 0:
        where = f"{roots[0]}/logs/" if len(roots) == 1 else \
            "<data root>/logs/ of each member (" + ", ".join(str(r) for r in roots) + ")"
        print(f"error: the workflow failed (snakemake exit status {rc}); each rule's log is under {where}",
              file=sys.stderr)
        if any((Path.cwd() / ".snakemake" / "locks").glob("*")):
            print("error: if no other run is active in this directory, a killed run left its lock: run the same "
                  "command once with --unlock, then again", file=sys.stderr)
        return rc
    if any(a in DRY_FLAGS for a in extra):
        return 0
    for dataset, members in plan.datasets.items():
        root = Path(dataset) if Path(dataset).is_absolute() else Path.cwd() / dataset
        _print_dataset(root, [m.split for m in members])
    return 0


def _print_dataset(root: Path, splits: list[str]) -> None:
    """Where a finished dataset is, where it was pushed, and a load_dataset line for each of its splits."""
    final = final_dir(root)
    if not (final / "README.md").is_file():
        return
    print(f"dataset: {final} (split{'s' if len(splits) > 1 else ''} {', '.join(map(repr, splits))})")
    try:
        pushed = json.loads((root / "push.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pushed = {}
    if pushed.get("pushed"):
        where = pushed.get("repo_id") or pushed.get("remote") or pushed.get("url")
        if where:
            print(f"pushed to: {where}")
    print("load it with:")
    for split in splits:
        name = _example_config_name(final, split)
        print(f"  datasets.load_dataset({json.dumps(str(final))}, {json.dumps(name)}, split={json.dumps(split)})")
