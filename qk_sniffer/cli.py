"""``sniff-qk``: the whole workflow (``run``) and each of its stages as a command.

``sniff-qk --config CONFIG`` is ``sniff-qk run --config CONFIG``: it runs the Snakemake workflow
(pull -> sniff every chunk -> merge -> render the dataset card -> push). The stage commands are
what the workflow's rules call; each reads the same YAML config and produces one file target
under the data root (README.md, "What you get").
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import textwrap
import traceback
from pathlib import Path

from .config import ConfigError, load_config
from .errors import exit_code, is_expected
from .run_command import cmd_run

log = logging.getLogger("qk_sniffer")


STAGES = {
    "pull": ("pull the remote dataset (output.hf_repo_id or output.remote_dir) into <data_root>/final/ and record "
             "the revision it pulled; with no remote, record an empty snapshot",
             "<data_root>/final/.snapshot.json"),
    "sniff-chunk": ("run the model over dataset shard --chunk of --num-chunks and stage one Parquet file per "
                    "captured (layer, head, q/k); the manifest is written last, so its presence means a complete chunk",
                    "<data_root>/staging/chunk-<i>/manifest.json"),
    "merge": ("merge every complete staged chunk into <data_root>/final/: new (example_id, position) rows are "
              "appended, rows already there win, only touched files are rewritten",
              "<data_root>/final/.merged.json"),
    "render-readme": ("write the dataset card: front matter listing every config and aggregate per split, and a "
                      "body with the run's metadata and statistics (plus a copy at output.readme_path)",
                      "<data_root>/final/README.md"),
    "report": ("draw the figures and tables of the workflow report (snakemake --report) from the final dataset and "
               "the staged chunk manifests",
               "<data_root>/report/"),
    "push": ("push the changed files of <data_root>/final/ to the remote in one commit guarded by the pulled "
             "revision; with no remote, record that nothing was pushed",
             "<data_root>/push.json"),
}

RUN_HELP = (
    "run the whole workflow through Snakemake: pull -> sniff-chunk (every chunk) -> merge -> render-readme -> "
    "push, producing <data_root>/push.json. Arguments this command does not know are passed to snakemake as they "
    "are, e.g. --resources gpu=2, --executor slurm, --profile workflow/profiles/slurm, -n (dry run), "
    "--forcerun pull_hub, a target file. --config is the YAML config here; several configs (or a glob) are a "
    "sweep run as one workflow, as is a config with a sweep: list (README.md, Sweeps). Everything after a lone -- "
    "goes to snakemake untouched (e.g. -- --config KEY=VALUE)."
)

VERIFY_HELP = (
    "Check DATA_ROOT without changing it: every final/data/<split>/<config>/data.parquet (readable, the dataset "
    "schema, unique sorted keys, layer/head/kind as the path says, buckets and sampling decisions of the recorded "
    "sampler), final/README.md's configs against the files, staged chunks against their manifests, and leftover "
    "temporary files. Prints one line per problem; exit status 1 when there is any. --config supplies the sampler "
    "of its split when the dataset records none. The workflow runs it before every push."
)

MIGRATE_HELP = (
    "Convert a dataset of the original qk-sniffer tool (columns bucket, example_id, position, vector, sliding_window; "
    "laid out as data/<split>/lLLhHH{q|k}/data.parquet or as lLLhHH{q|k}/data.parquet at the top of a per-model "
    "branch) into this project's layout and schema under <data_root>/final/ of --config: layer/head/kind from the "
    "path, rows sorted by and unique on (example_id, position), the dataset card rendered, and each split's sampling "
    "recorded as the original tool's (appending captures to it then needs output.allow_mixed_sampling). SOURCE is a "
    "folder; without it the config's remote is read. Bad input changes nothing; running it again changes nothing. "
    "The original's files are left as they are: publish the result to another branch or repo."
)

class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _debug_env() -> bool:
    return os.environ.get("QK_SNIFFER_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    if not debug:
        for noisy in ("httpx", "httpcore", "urllib3", "filelock", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


# -- argument parsing --------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, config_required: bool = True, many: bool = False) -> None:
    if many:  # several configs: the members of a sweep (run), or the members sharing one data root (stages)
        p.add_argument("--config", required=config_required, metavar="PATH", nargs="+", action="extend",
                       help="YAML config(s) (validated against workflow/schemas/config.schema.yaml; see "
                            "config/README.md); several, or a quoted glob, for a sweep (README.md, Sweeps)")
    else:
        p.add_argument("--config", required=config_required, metavar="PATH",
                       help="YAML config (validated against workflow/schemas/config.schema.yaml; see config/README.md)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="log at DEBUG level and show tracebacks (also QK_SNIFFER_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    stage_lines = "\n".join(f"  {name:<14} -> {target}" for name, (_, target) in STAGES.items())
    parser = argparse.ArgumentParser(
        prog="sniff-qk",
        formatter_class=_Formatter,
        description=(
            "Capture sampled query/key vectors of a Hugging Face causal LM into a Parquet dataset.\n\n"
            "`sniff-qk --config CONFIG [snakemake args]` is the same as `sniff-qk run --config CONFIG ...`.\n"
            "Each stage command produces one file target under the data root (output.data_root,\n"
            "default data/<split name>):\n"
            f"  {'run':<14} -> <data_root>/push.json (every stage below, through Snakemake)\n{stage_lines}"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG level and show tracebacks "
                        "(also QK_SNIFFER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole workflow through Snakemake -> <data_root>/push.json",
                         description=textwrap.fill(RUN_HELP, 100), formatter_class=_Formatter)
    _add_common(run, many=True)
    run.add_argument("--cores", default=None, metavar="N",
                     help="CPU cores Snakemake may use (default: all, except under a cluster executor, where each "
                          "job's own threads decide)")

    for name, (what, target) in STAGES.items():
        p = sub.add_parser(name, help=f"{what.split(';')[0].split(':')[0]} -> {target}",
                           description=textwrap.fill(f"{what[0].upper()}{what[1:]}.", 100)
                           + f"\n\nProduces: {target}",
                           formatter_class=_Formatter)
        _add_common(p, many=name != "sniff-chunk")
        if name == "sniff-chunk":
            p.add_argument("--chunk", type=int, required=True, metavar="I", help="index of the shard, 0-based")
            p.add_argument("--threads", type=int, default=None, metavar="T",
                           help="CPU threads for torch (default: torch's own choice)")
            p.add_argument("--plan", default=None, metavar="PATH",
                           help="the chunk's plan file (its examples and fingerprint; the workflow passes "
                                "<data_root>/.qk-sniffer/chunks/chunk-I.json, so a config changed under a running "
                                "workflow is caught); default: plan it here from the data root's records")
        if name == "report":
            p.add_argument("--out", default=None, metavar="DIR",
                           help="folder for the figures and tables (default: <data_root>/report)")
    verify = sub.add_parser(
        "verify", help="check a data root's dataset, card and staged chunks (changes nothing)",
        description=textwrap.fill(VERIFY_HELP, 100), formatter_class=_Formatter)
    verify.add_argument("data_root", metavar="DATA_ROOT", nargs="?", default=None,
                        help="the data root to check (default: output.data_root of --config)")
    verify.add_argument("--json", default=None, metavar="PATH",
                        help="also write the report as JSON to PATH (atomically) when the check passes")
    _add_common(verify, config_required=False, many=True)
    migrate = sub.add_parser(
        "migrate", help="convert a dataset of the original qk-sniffer tool into this project's format -> "
                        "<data_root>/final/", description=textwrap.fill(MIGRATE_HELP, 100), formatter_class=_Formatter)
    migrate.add_argument("source", metavar="SOURCE", nargs="?", default=None,
                         help="folder holding the original tool's dataset (a download of its repo or branch); "
                              "default: the config's remote (output.hf_repo_id@hf_branch or output.remote_dir)")
    _add_common(migrate)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _split_run_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``run``'s own options from the ones passed through to snakemake (order kept)."""
    own: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            rest.extend(args[i + 1:])
            break
        if tok in ("--config", "--cores"):
            own.extend(args[i:i + 2])
            i += 2
            # `--config cfgs/*.yaml`: the shell's glob gives one path per config; the YAML files after the first
            # are configs too (snakemake's targets are the outputs of rules, never YAML files)
            while tok == "--config" and i < len(args) and args[i].lower().endswith((".yaml", ".yml")) \
                    and not args[i].startswith("-"):
                own.append(args[i])
                i += 1
            continue
        if tok.startswith(("--config=", "--cores=")) or tok in ("--debug", "-h", "--help"):
            own.append(tok)
        else:
            rest.append(tok)
        i += 1
    return own, rest


# -- commands ----------------------------------------------------------------------------------


def cmd_sniff_chunk(config: str, chunk: int, threads: int | None, plan: str | None) -> int:
    cfg = load_config(config)
    if chunk < 0:
        raise ConfigError(f"--chunk: {chunk} is out of range; chunks are numbered from 0")
    spec = None
    if plan is not None:
        from .chunk.plan import ChunkSpec

        spec = ChunkSpec.read(plan)
    device = cfg["inference"]["device"]
    gpus = 0 if device == "cpu" else cfg["workflow"]["gpus_per_chunk"]
    if device == "cuda" and gpus == 0:
        raise ConfigError("inference.device is cuda but workflow.gpus_per_chunk is 0; set one of them differently")

    from .chunk.gpu import lease_gpus

    # CPU matrix products bitwise reproducible run to run (MKL otherwise lets results depend on
    # memory alignment); read by MKL when it initialises, so set before torch is imported
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # the lease sets CUDA_VISIBLE_DEVICES, so it comes before anything initialises CUDA
    with lease_gpus(gpus):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from .chunk.run import run_chunk
        from .chunk.tokens import cache_for

        # a sweep member sharing its dataset and tokenizer with others: tokens shared through a cache
        manifest = run_chunk(cfg, chunk, spec, token_cache=cache_for(config))
    rows = sum(manifest["rows"].values())
    log.info("chunk %d (examples [%s, %s)): %d examples, %d tokens, %d rows in %d files on %s (%.1fs)", chunk,
             *manifest["example_range"], manifest["examples"], manifest["tokens"], rows, len(manifest["files"]),
             manifest["device"], manifest["timings"]["total_s"])
    return 0


def cmd_verify(data_root: str, config: str | list[str] | None, json_path: str | None = None) -> int:
    from .layout import atomic_write_json
    from .verify import verify

    configs = [config] if isinstance(config, str) else list(config or [])
    if len(configs) > 1 and data_root is None:  # the members of a sweep sharing one data root
        from .sweep_stages import verify_all

        report = verify_all([load_config(c) for c in configs])
        print(report.format())
        if report.ok and json_path:
            atomic_write_json(Path(json_path), {"ok": True, "checked": report.checked, "warnings": report.warnings})
        return 0 if report.ok else 1
    cfg = load_config(configs[0]) if configs else None
    if data_root is None:
        if cfg is None:
            raise ConfigError("verify: give DATA_ROOT or --config (whose output.data_root is checked)")
        from .config import data_root as root_of

        data_root = root_of(cfg)
    report = verify(Path(data_root), cfg=cfg)
    print(report.format())
    if report.ok and json_path:
        atomic_write_json(Path(json_path), {"ok": True, "checked": report.checked, "warnings": report.warnings})
    return 0 if report.ok else 1


def cmd_stage(name: str, config: str | list[str]) -> int:
    configs = [config] if isinstance(config, str) else list(config)
    if len(configs) > 1:  # the members of a sweep sharing one data root: the stage once for all of them
        from . import sweep_stages

        cfgs = [load_config(c) for c in configs]
        {"pull": sweep_stages.pull_all, "merge": sweep_stages.merge_all, "render-readme": sweep_stages.render_all,
         "push": sweep_stages.push_all}[name](cfgs)
        return 0
    cfg = load_config(configs[0])
    if name == "pull":
        from .remote.sync import pull

        pull(cfg)
    elif name == "merge":
        from .merge import merge_staging

        merge_staging(cfg)
    elif name == "render-readme":
        from .card import render_readme

        render_readme(cfg)
    elif name == "push":
        from .sweep_stages import push_one

        push_one(cfg)
    else:  # pragma: no cover - argparse restricts the names
        raise AssertionError(name)
    return 0


# -- entry point -------------------------------------------------------------------------------


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
    if args.command == "run":
        return cmd_run(args.config, args.cores, extra)
    if args.command == "sniff-chunk":
        return cmd_sniff_chunk(args.config, args.chunk, args.threads, args.plan)
    if args.command == "verify":
        return cmd_verify(args.data_root, args.config, args.json)
    if args.command == "migrate":
        from .migrate import cmd_migrate

        return cmd_migrate(args.config, args.source)
    if args.command == "report":
        from .report import report_main

        configs = [args.config] if isinstance(args.config, str) else args.config
        if len(configs) > 1:
            from .sweep_stages import report_all

            report_all([load_config(c) for c in configs], args.out)
            return 0
        report_main(load_config(configs[0]), args.out)
        return 0
    return cmd_stage(args.command, args.config)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    # `sniff-qk [--debug] --config X ...` (no command) is `run`, as in the original tool
    lead = [a for a in argv[:1] if a == "--debug"]
    body = argv[len(lead):]
    commands = {"run", "verify", "migrate", *STAGES}
    extra: list[str] = []
    if body and body[0] not in commands and not body[0].startswith("-"):
        guess = difflib.get_close_matches(body[0].replace("_", "-"), sorted(commands), n=1)
        hint = f" Did you mean '{guess[0]}'?" if guess else ""
        names = ', '.join(['run', 'verify', 'migrate', *STAGES])
        print(f"error: unknown command '{body[0]}'.{hint} Commands: {names}.", file=sys.stderr)
        return 2
    if body and body[0] not in commands and body[0] not in ("-h", "--help", "--version"):
        body = ["run", *body]
    if body and body[0] == "run":
        own, extra = _split_run_args(body[1:])
        args = parser.parse_args([*lead, "run", *own])
    else:
        args = parser.parse_args([*lead, *body])
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    debug = bool(getattr(args, "debug", False)) or _debug_env()
    _setup_logging(debug)
    try:
        return _dispatch(args, extra)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the package's own errors and the system's are one line
        if debug or not is_expected(exc):
            traceback.print_exc()
        print(f"error: {exc}" if is_expected(exc) else f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exit_code(exc)
