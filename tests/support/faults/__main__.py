"""Fault injection: SIGKILL the whole workflow at seeded random moments, resume it, compare with a clean run.

The command line, from the repository root: ``python -m tests.support.faults --trials 20 --seed 0`` (the
package's docstring says what each trial does and checks)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .harness import FaultHarness
from .summary import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="number of kill-and-resume trials (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--keep", metavar="DIR", default=None,
                        help="work under DIR and keep it (default: a temporary directory, removed at the end)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the summary and trials as JSON")
    args = parser.parse_args(argv)
    start = time.monotonic()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qk-faults-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        with FaultHarness(base, seed=args.seed, log=lambda s: print(s, flush=True)) as h:
            results = h.run_trials(args.trials)
        summary = summarize(results, time.monotonic() - start)
        print(json.dumps(summary, indent=2))
        if args.json:
            trials = [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "attempts"},
                       "attempts": [{k: v for k, v in dataclasses.asdict(a).items() if k != "output"}
                                    for a in r.attempts]} for r in results]
            Path(args.json).write_text(json.dumps({"summary": summary, "trials": trials}, indent=2), encoding="utf-8")
        return 0 if summary["all_identical"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
