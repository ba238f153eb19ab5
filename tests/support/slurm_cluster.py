"""A throwaway single-node SLURM cluster for tests.

``local_slurm()`` starts ``munged``, ``slurmctld`` and ``slurmd`` as child processes of the test
(in the foreground, so their process ids are known), everything in a fresh directory: the MUNGE
key and socket, ``slurm.conf`` and ``cgroup.conf``, the state and spool directories, pid and log
files. Nothing under /etc is read or written, the daemons listen on free ports chosen at start,
so neither a system SLURM nor the leftovers of an earlier run get in the way. Clients find the
cluster through ``SLURM_CONF``, which :attr:`SlurmCluster.env` carries; pass that environment to
every process that calls ``sbatch``/``squeue``/``srun`` (Snakemake's SLURM executor does, and its
``sbatch --export=ALL`` hands it on to the jobs).

One shim: inside a job, Snakemake's ``slurm-jobstep`` executor starts the rule with ``srun`` in an
environment stripped of every ``SLURM_*`` variable but the job's identity, ``SLURM_CONF``
included, so that ``srun`` would look for /etc/slurm/slurm.conf. Rather than write there,
:attr:`SlurmCluster.env` puts ``<root>/bin`` first on ``PATH``, where an ``srun`` script sets
``SLURM_CONF`` again and runs the real ``srun``. (A real cluster keeps its config in /etc/slurm or
serves it configless, and needs nothing of the kind.)

The node is this machine: its CPUs (``os.cpu_count()``), its memory from /proc/meminfo less some
headroom, and no GRES, so a job that asks for a GPU is refused at submission.

Needs root (the daemons run as root and so do the jobs) and the Debian packages ``slurm-wlm`` and
``munge``; :func:`unavailable_reason` says what is missing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
INSTALL_HINT = "apt-get install -y slurm-wlm munge"
# memory left to the machine itself, outside what the node offers to jobs
MEMORY_HEADROOM_MB = 1024


def _which(name: str) -> str | None:
    # the daemons live in /usr/sbin, which is not on every PATH
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def unavailable_reason() -> str | None:
    """Why a local SLURM cluster cannot be started here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting a local SLURM cluster needs root (slurmd runs the jobs as their submitting user)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"SLURM/MUNGE programs not found: {', '.join(missing)} (install them with `{INSTALL_HINT}`)"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                total_mb = int(line.split()[1]) // 1024
                return max(total_mb - MEMORY_HEADROOM_MB, 512)
    raise RuntimeError("no MemTotal line in /proc/meminfo")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError as exc:
        return f"({path}: {exc})"


@dataclass
class SlurmCluster:
    """A running single-node cluster: where its files are and how to talk to it."""

    root: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    memory_mb: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM client (``sinfo``, ``squeue``, ``scontrol``, ...) against this cluster."""
        exe = _which(args[0]) or args[0]
        res = subprocess.run([exe, *args[1:]], env=self.env, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"`{' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}\n{self.logs()}")
        return res

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` of one job as a dict (JobId, JobName, JobState, ExitCode, Command, ...).

        Finished jobs stay visible for MinJobAge (300 s) after they end.
        """
        out = self.command("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        fields: dict[str, str] = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def node_state(self) -> str:
        res = self.command("sinfo", "--noheader", "--Node", "--format=%t", "--nodes", self.node, check=False)
        return res.stdout.strip()

    def logs(self) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld", "slurmd", "munged"):
            for path in (self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"):
                if path.exists() and path.stat().st_size:
                    parts.append(f"--- {path}\n{_tail(path)}")
        return "\n".join(parts)


def _write_config(root: Path, *, node: str, partition: str, cpus: int, memory_mb: int, munge_socket: Path) -> Path:
    conf = root / "etc" / "slurm.conf"
    lines = [
        "# single-node test cluster, written by tests/support/slurm_cluster.py",
        "ClusterName=qktest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        # the node is what this file says, whatever slurmd detects (containers show odd topologies)
        "SlurmdParameters=config_overrides",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "ReturnToService=2",
        # finished jobs stay in squeue this long: Snakemake's squeue status mode needs that
        "MinJobAge=300",
        "InactiveLimit=0",
        "KillWait=5",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MailProg=/bin/true",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (conf.parent / "cgroup.conf").write_text("ConstrainCores=no\nConstrainRAMSpace=no\n", encoding="utf-8")
    return conf


def _start(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    out = open(log_dir / f"{name}.out", "wb")  # noqa: SIM115 - owned by the daemon for its lifetime
    try:
        return subprocess.Popen([_which(name) or name, *args], env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def _cancel_all(cluster: SlurmCluster) -> None:
    """Cancel whatever is still queued or running, so no job outlives the cluster."""
    with contextlib.suppress(Exception):
        res = cluster.command("squeue", "--noheader", "--format=%i", "--states=PENDING,RUNNING,SUSPENDED,CONFIGURING",
                              check=False, timeout=10)
        ids = res.stdout.split()
        if ids:
            cluster.command("scancel", *ids, check=False, timeout=10)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                left = cluster.command("squeue", "--noheader", "--format=%i", check=False, timeout=10).stdout.split()
                if not set(ids) & set(left):
                    break
                time.sleep(0.5)


@contextlib.contextmanager
def local_slurm(root: Path | None = None, *, partition: str = "main", start_timeout: float = 90.0,
                keep_files: bool = False) -> Iterator[SlurmCluster]:
    """Start a single-node SLURM cluster, yield it once its node is idle, stop it at the end.

    ``root`` is a fresh (empty or absent) directory for the cluster's files; by default a new
    temporary directory, removed afterwards unless ``keep_files``. The daemons are stopped by
    process id on the way out, also when the start or the body fails.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    owned = root is None
    root = Path(tempfile.mkdtemp(prefix="qk-slurm-")) if root is None else Path(root)
    if root.exists() and any(root.iterdir()):
        raise RuntimeError(f"{root} is not empty: a local SLURM cluster needs a fresh directory")
    for sub in ("bin", "etc", "munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged wants its socket directory searchable by everyone, its key private
    root.chmod(0o755)
    (root / "munge").chmod(0o755)

    node = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory_mb = _memory_mb()
    munge_socket = root / "munge" / "munge.sock"
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = _write_config(root, node=node, partition=partition, cpus=cpus, memory_mb=memory_mb,
                         munge_socket=munge_socket)

    srun = root / "bin" / "srun"
    real_srun = shlex.quote(_which("srun") or "srun")
    srun.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(conf))} exec {real_srun} "$@"\n', encoding="utf-8")
    srun.chmod(0o755)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    env["PATH"] = os.pathsep.join([str(root / "bin"), env.get("PATH", os.defpath)])
    cluster = SlurmCluster(root=root, conf=conf, node=node, partition=partition, cpus=cpus, memory_mb=memory_mb,
                           env=env)
    log_dir = cluster.log_dir
    try:
        cluster.processes["munged"] = _start(
            "munged",
            ["--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
             f"--pid-file={root / 'run' / 'munged.pid'}", f"--log-file={log_dir / 'munged.log'}",
             f"--seed-file={root / 'munge' / 'munged.seed'}"],
            env, log_dir)
        _wait(lambda: munge_socket.exists(), start_timeout, "munged did not create its socket", cluster)
        cluster.processes["slurmctld"] = _start("slurmctld", ["-D", "-i", "-f", str(conf)], env, log_dir)
        _wait(lambda: cluster.command("scontrol", "ping", check=False, timeout=10).stdout.count("is UP") > 0,
              start_timeout, "slurmctld did not answer `scontrol ping`", cluster)
        cluster.processes["slurmd"] = _start("slurmd", ["-D", "-f", str(conf), "-N", node], env, log_dir)
        _wait(lambda: cluster.node_state() == "idle", start_timeout, f"node {node} did not become idle", cluster)
        yield cluster
    finally:
        if cluster.processes.get("slurmctld") is not None and cluster.processes["slurmctld"].poll() is None:
            _cancel_all(cluster)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = cluster.processes.get(name)
            if proc is not None:
                _stop(proc)
        if owned and not keep_files:
            shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting the test cluster\n"
                                   f"{cluster.logs()}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s\n{cluster.logs()}")
        time.sleep(0.5)
