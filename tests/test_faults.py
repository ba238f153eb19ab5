"""Faults: the workflow killed at random points loses and corrupts nothing; the token stays off disk and out of output.

The kill-and-resume trials are tests/support/faults/ (its docstring says what each trial does and checks).
Here a few seeded trials run, one per stage (sniff_chunk, merge_staging, render_readme, push_hub),
against the fake Hub of tests/support/fakehub/ running in this process (about 2.5 minutes on 2 cores with
the reference run; the whole module about 3.5). The full run, 20 trials (about 10 minutes):

    QK_FAULT_TRIALS=20 pytest tests/test_faults.py -k random

(``QK_FAULT_SEED`` changes the seed; ``python -m tests.support.faults --trials 20`` is the same without pytest.)
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qk_sniffer.remote.hub_http import DEFAULT_RETRY
from qk_sniffer.verify import verify

from .support.fakehub import FakeHub
from .support.faults import (
    STAGES,
    FaultHarness,
    glob_match,
    remote_problems,
    run_snakemake,
    scan_for,
    set_repo,
    summarize,
    temp_files,
    tree_problems,
)
from .support.workflow_runs import copy_workdir
from .test_fakehub import CARD

TRIALS = int(os.environ.get("QK_FAULT_TRIALS", "4"))
SEED = int(os.environ.get("QK_FAULT_SEED", "0"))
TOKEN = "hf_" + "Qk7sNf" + "9x2LmPz4RtVb8WcYd3JhGe6UaKo"  # the shape of a real token (redact() masks that shape)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The fake Hub (token-protected) and the reference run every trial is compared with."""
    hub = FakeHub(token=TOKEN).start()
    h = FaultHarness(tmp_path_factory.mktemp("faults"), seed=SEED, hub=hub)
    try:
        h.reference()
        yield h
    finally:
        hub.stop()


# ------------------------------------------------------------------------------- the checks themselves


def parquet(n: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"example_id": pa.array(range(n), pa.int64())}), buf)
    return buf.getvalue()



def test_tree_check_finds_half_states():
    good = {"README.md": CARD, "data/tiny/l00h00q/data.parquet": parquet(3), "data/tiny/l00h01q/data.parquet": parquet(2)}
    assert tree_problems(good, "t") == []
    assert tree_problems({"data/tiny/l00h00q/data.parquet": parquet(3)}, "t") == []  # data before its card: fine
    truncated = {**good, "data/tiny/l00h00q/data.parquet": parquet(3)[:-20]}
    assert [p for p in tree_problems(truncated, "t") if "not readable Parquet" in p]
    missing = {"README.md": CARD, "data/tiny/l00h01q/data.parquet": parquet(3)}
    assert tree_problems(missing, "t") == [
        "t: README.md config l00h00q lists data/tiny/l00h00q/*.parquet, which matches no file"]
    temp = {**good, "data/tiny/l00h00q/.data.parquet.x1y2.tmp": b"half"}
    assert tree_problems(temp, "t") == ["t: temporary file data/tiny/l00h00q/.data.parquet.x1y2.tmp"]
    assert tree_problems({"README.md": b"---\nconfigs: [\n---\n"}, "t")[0].startswith("t: README.md front matter")
    assert glob_match("data/tiny/*/*.parquet", "data/tiny/l00h00q/data.parquet")
    assert not glob_match("data/tiny/*.parquet", "data/tiny/l00h00q/data.parquet")  # * stays within one folder


def test_remote_check_looks_at_every_commit():
    with FakeHub() as hub:
        assert remote_problems(hub, "tester/none") == []  # no repository yet: a consistent state
        hub.create_repo("tester/r")
        hub.commit("tester/r", {"README.md": CARD, "data/tiny/l00h00q/data.parquet": parquet(2),
                                "data/tiny/l00h01q/data.parquet": parquet(2)})
        assert remote_problems(hub, "tester/r") == []
        hub.commit("tester/r", {"data/tiny/l00h00q/data.parquet": b"PAR1 cut"})
        hub.commit("tester/r", {"data/tiny/l00h00q/data.parquet": parquet(4)})  # repaired at the head, not before
        problems = remote_problems(hub, "tester/r")
        assert len(problems) == 1 and "not readable Parquet" in problems[0]


def test_scan_finds_the_secret(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.log").write_bytes(b"Authorization: Bearer " + TOKEN.encode() + b"\n")
    (tmp_path / "a" / "y.bin").write_bytes(b"\0" + TOKEN[-16:].encode())  # a truncated copy counts too
    (tmp_path / "z.txt").write_text("hf_***")
    hits, n = scan_for(TOKEN, tmp_path)
    assert n == 3 and sorted(Path(h).name for h in hits) == ["x.log", "y.bin"]


# ------------------------------------------------------------------------------- kills at random points


@pytest.mark.slow
def test_random_kills_lose_and_corrupt_nothing(harness):
    results = [harness.trial(i) for i in range(TRIALS)]
    summary = summarize(results, sum(r.wall_s for r in results))
    print(json.dumps(summary, indent=2))
    report = "\n".join(r.describe() for r in results)
    assert summary["kills"] >= TRIALS, report  # every trial was killed at least once
    if TRIALS >= len(STAGES):
        assert set(summary["trials_per_stage"]) == set(STAGES)
    assert summary["all_identical"], report


# ------------------------------------------------------------------------------- product failures, pinned


@pytest.mark.slow
def test_write_killed_inside_final_does_not_block_the_rerun(harness, tmp_path):
    """A merge killed while writing leaves its temporary file in final/; the rerun must still complete.

    The process running the real atomic write (qk_sniffer.layout.atomic_output) is killed with
    SIGKILL inside it, exactly where a kill of merge_staging mid-write lands; the rerun of the
    merge (and what follows it) must clean up after it rather than fail verify_dataset forever.
    """
    work = copy_workdir(harness.reference_work, tmp_path / "work")
    set_repo(work, "tester/faults-killed-write")
    target = work / "root" / "final" / "data" / "tiny" / "l00h00q" / "data.parquet"
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom qk_sniffer.layout import atomic_output\n"
            "with atomic_output(Path(sys.argv[1])) as fh:\n    fh.write(b'PAR1 half a file')\n    fh.flush()\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    res = subprocess.run([sys.executable, "-c", code, str(target)], timeout=120, check=False)
    assert res.returncode == -signal.SIGKILL
    left = temp_files(work / "root")
    assert len(left) == 1 and left[0].startswith("final/data/tiny/l00h00q/.data.parquet."), left

    run = run_snakemake(work, harness.env("killed-write"), tmp_path / "rerun.log", "--forcerun", "merge_staging")
    assert run.rc == 0, run.output[-4000:]
    assert temp_files(work / "root") == []
    assert verify(work / "root").ok


@pytest.mark.slow
def test_nothing_reads_final_while_push_may_rewrite_it(harness):
    """push_hub rewrites final/ when the remote moved (pull, merge, render again): no reader of final/ runs beside it.

    A push killed after it created the repository finds, on the rerun, that the remote "moved": it
    pulls (removing every local file the remote lacks), merges and renders again, while
    render_report, which Snakemake starts at the same time, reads final/ and fails on a file that
    has just been removed (seen in the random trials aimed at push_hub).
    """
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(Path(__file__).resolve().parent.parent / "Snakefile"),
         "--directory", str(harness.reference_work), "--configfile", str(harness.reference_work / "cfg.yaml"),
         "--rulegraph", "--forceall"],
        capture_output=True, text=True, timeout=300, check=False, env=harness.env("rulegraph"))
    assert res.returncode == 0, res.stderr[-3000:]
    names = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)"', res.stdout, re.M))
    edges = [(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", res.stdout, re.M)]

    def after(rule: str) -> set[str]:
        """The rules that run only once ``rule`` has finished."""
        seen, todo = set(), [rule]
        while todo:
            node = todo.pop()
            for a, b in edges:
                if a == node and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    readers = {"verify_dataset", "render_report"}  # the rules that read final/ and are not on push_hub's input path
    assert readers <= set(names.values())
    for rule in sorted(readers):
        assert "push_hub" in after(rule) or rule in after("push_hub"), f"{rule} may run while push_hub rewrites final/"


# ------------------------------------------------------------------------------- the token


@pytest.mark.slow
def test_token_is_nowhere_on_disk_or_in_output(harness, tmp_path):
    """A full run with HF_TOKEN set leaves the token in no file and no output; nor does a push that fails."""
    ref = harness.reference_work
    commits = harness.hub.requests_matching("POST", r"^/api/datasets/tester/faults-reference/commit/")
    assert commits and all(r.auth == "valid" for r in commits)  # the run did push with the token

    # everything the harness wrote: the reference's working directory (data root, .snakemake/), the snakemake
    # output it captured, every HF_HOME, and the trials' directories when they ran before
    assert {p.name for p in harness.base.glob("reference-*.log")} == {"reference-chunks.log", "reference-rest.log"}
    hits, n = scan_for(TOKEN, harness.base)
    root = ref / "root"
    for must in (root / "push.json", root / "logs" / "push_hub.log", root / "final" / ".snapshot.json",
                 root / "report" / "run" / "stats.json"):
        assert must.is_file()
    assert list((ref / ".snakemake" / "metadata").iterdir()) and list((ref / ".snakemake" / "log").iterdir())
    assert n > 100 and hits == [], hits

    # a push the Hub refuses with 500, its error message echoing the token back
    repo = "tester/faults-refused"
    work = copy_workdir(ref, tmp_path / "work")
    set_repo(work, repo)
    harness.hub.fail_next("POST", rf"^/api/datasets/{repo}/commit/", "status", status=500,
                          message=f"internal error (request authorized with {TOKEN})", times=100)
    run = run_snakemake(work, harness.env("refused"), tmp_path / "refused.txt", "--show-failed-logs")
    assert run.rc != 0
    tried = harness.hub.requests_matching("POST", rf"^/api/datasets/{repo}/commit/")
    assert 2 <= len(tried) <= DEFAULT_RETRY.attempts  # retried, and boundedly
    log = (work / "root" / "logs" / "push_hub.log").read_text()
    assert "internal error (request authorized with ***)" in log  # the echo reached the message, masked
    assert "internal error" in run.output  # the failed job's log went through snakemake's output
    hits, n = scan_for(TOKEN, work, tmp_path / "refused.txt", harness.base / "hf-home")
    assert n > 100 and hits == [], hits
