"""GPU slot leases for concurrent ``sniff-chunk`` processes on one machine.

Snakemake's ``--resources gpu=N`` only counts: it keeps at most N GPUs' worth of jobs running,
but does not say which GPU each job should use. Each ``sniff-chunk`` therefore leases its GPUs
itself before CUDA is initialised:

* a scheduler that already assigned devices wins: under SLURM (``SLURM_JOB_ID`` set) an
  existing ``CUDA_VISIBLE_DEVICES`` is used as it is;
* otherwise the candidate devices are ``$QK_SNIFFER_GPUS`` (e.g. ``0,1,2,3``), else the
  entries of a user-set ``CUDA_VISIBLE_DEVICES``, else the GPUs ``nvidia-smi -L`` lists;
* one lock file per device lives in the lock directory (``$QK_SNIFFER_GPU_LOCK_DIR``, default
  ``/tmp/qk-sniffer-gpu-locks-<uid>``); a lease holds a :class:`filelock.FileLock` (an exclusive
  ``flock`` on Linux) on N of them, taken in device order, and waits (with backoff) while fewer
  than N are free. The kernel drops a ``flock`` when its holder dies, SIGKILL included, so a
  crashed job never strands a GPU;
* the leased devices become ``CUDA_VISIBLE_DEVICES`` for the rest of the process, so the model
  sees them as ``cuda:0..N-1``.

With no GPU the chunk runs on the CPU; ``n=0`` (``workflow.gpus_per_chunk: 0``) forces the CPU by
setting ``CUDA_VISIBLE_DEVICES`` to the empty string.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..config import ConfigError
from ..errors import QkSnifferError

log = logging.getLogger("qk_sniffer.chunk.gpu")

ENV_GPUS = "QK_SNIFFER_GPUS"
ENV_LOCK_DIR = "QK_SNIFFER_GPU_LOCK_DIR"
CVD = "CUDA_VISIBLE_DEVICES"


class GpuLeaseTimeout(QkSnifferError, TimeoutError):
    """No GPU slot became free within the allowed time."""


@dataclass
class Lease:
    """What a ``sniff-chunk`` process got: the devices it may use and how they were chosen."""

    devices: list[str]
    source: str  # "lease", "scheduler", "cpu" (no GPU visible) or "forced-cpu" (n == 0)
    lock_dir: Path | None = None
    waited_s: float = 0.0
    _locks: list[FileLock] = field(default_factory=list, repr=False)

    @property
    def cuda_visible_devices(self) -> str | None:
        return os.environ.get(CVD)


def default_lock_dir() -> Path:
    """``$QK_SNIFFER_GPU_LOCK_DIR``, else ``/tmp/qk-sniffer-gpu-locks-<uid>``.

    A fixed path rather than ``$TMPDIR``: schedulers give every job its own ``TMPDIR``, and all
    jobs on one machine must see the same lock files.
    """
    env = os.environ.get(ENV_LOCK_DIR)
    if env:
        return Path(env)
    return Path("/tmp") / f"qk-sniffer-gpu-locks-{os.getuid()}"


def _split_devices(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    # CUDA stops at the first invalid entry ("-1" is the usual way to hide every device)
    out: list[str] = []
    for item in items:
        if item.startswith("-"):
            break
        out.append(item)
    return out


def _nvidia_smi_devices() -> list[str] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi -L failed (%s); assuming no GPU", exc)
        return []
    if res.returncode != 0:
        log.warning("nvidia-smi -L exited with %d: %s", res.returncode, res.stderr.strip()[:200])
        return []
    return [str(i) for i, line in enumerate(ln for ln in res.stdout.splitlines() if ln.startswith("GPU "))]


def _torch_devices_in_subprocess() -> list[str]:
    """Count CUDA devices in a child process, so this process's CUDA stays uninitialised."""
    # importing torch does not initialise CUDA (CUDA_VISIBLE_DEVICES is read when it does), and the
    # chunk imports it next anyway; a CPU-only build needs no child process (which costs a torch import)
    import torch

    if getattr(torch.version, "cuda", None) is None and not getattr(torch.version, "hip", None):
        return []
    env = {k: v for k, v in os.environ.items() if k != CVD}
    code = "import torch; print(torch.cuda.device_count())"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env=env, check=False)
        n = int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip() else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        n = 0
    return [str(i) for i in range(n)]


def _detect() -> tuple[list[str], str]:
    env = os.environ.get(ENV_GPUS)
    if env is not None:
        return _split_devices(env), ENV_GPUS
    if CVD in os.environ:
        return _split_devices(os.environ[CVD]), CVD
    found = _nvidia_smi_devices()
    if found is not None:
        return found, "nvidia-smi"
    return _torch_devices_in_subprocess(), "torch"


def detect_gpus() -> list[str]:
    """The devices a lease may hand out, without initialising CUDA in this process."""
    return _detect()[0]


def scheduler_devices() -> list[str] | None:
    """Devices a scheduler already assigned to this job (SLURM sets ``CUDA_VISIBLE_DEVICES``), else None."""
    if os.environ.get("SLURM_JOB_ID") and CVD in os.environ:
        return _split_devices(os.environ[CVD])
    return None


def _cuda_already_initialised() -> bool:
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop the lease
        return False


def _lock_name(device: str) -> str:
    return "gpu-" + re.sub(r"[^\w.-]", "_", device) + ".lock"


def _write_holder(fd: int) -> None:
    """Record who holds the lock in the lock file itself, for the message of :class:`GpuLeaseTimeout`.

    filelock calls this with the locked descriptor right after each acquire; it opens the file
    without truncating, so a contender that fails to lock leaves the holder's line in place.
    """
    line = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode(), 0)


def _try_lock(path: Path) -> FileLock | None:
    """One non-blocking attempt at the device's lock file: the held lock, or None when another holds it.

    Each attempt is a new :class:`filelock.FileLock` with its own descriptor, so a second lease in
    the same process competes like another process; on Linux it is an ``flock``, which the
    kernel drops when the holder dies (SIGKILL included). ``preserve_lock_file`` keeps the lock
    file after release (all contenders must lock the same inode) and refuses filelock's fallback
    to an existence-based soft lock, which a killed holder would strand.
    """
    lock = FileLock(path, thread_local=False, preserve_lock_file=True, on_acquired=_write_holder)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return None
    return lock


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def _acquire(devices: list[str], n: int, lock_dir: Path) -> tuple[list[str], list[FileLock]]:
    """Lock the first ``n`` free devices in order: their names and locks, or nothing when fewer are free."""
    got: list[str] = []
    locks: list[FileLock] = []
    for dev in devices:
        lock = _try_lock(lock_dir / _lock_name(dev))
        if lock is None:
            continue
        got.append(dev)
        locks.append(lock)
        if len(got) == n:
            return got, locks
    for lock in locks:  # not enough: hold nothing while waiting, so two multi-GPU jobs cannot deadlock
        lock.release()
    return [], []


@contextlib.contextmanager
def lease_gpus(n: int, *, lock_dir: str | Path | None = None, visible: list[str] | None = None,
               timeout: float | None = None, poll: float = 0.2, max_poll: float = 5.0) -> Iterator[Lease]:
    """Lease ``n`` GPUs for the body of the ``with`` block; see the module docstring.

    ``visible`` overrides detection (the candidate devices, in the order they are tried);
    ``timeout`` (seconds) bounds the wait, after which :class:`GpuLeaseTimeout` is raised.
    ``CUDA_VISIBLE_DEVICES`` is set for the body and restored afterwards.
    """
    if n < 0:
        raise ConfigError(f"workflow.gpus_per_chunk: {n} is negative; use 0 for the CPU or a GPU count")
    previous = os.environ.get(CVD)

    def restore() -> None:
        if previous is None:
            os.environ.pop(CVD, None)
        else:
            os.environ[CVD] = previous

    if n == 0:
        os.environ[CVD] = ""
        log.info("gpus_per_chunk is 0: running on the CPU (CUDA_VISIBLE_DEVICES='')")
        try:
            yield Lease(devices=[], source="forced-cpu")
        finally:
            restore()
        return

    assigned = scheduler_devices()
    if assigned is not None:
        log.info("using the GPUs the scheduler assigned (job %s): CUDA_VISIBLE_DEVICES=%r",
                 os.environ.get("SLURM_JOB_ID"), os.environ[CVD])
        if assigned and len(assigned) < n:
            log.warning("the scheduler assigned %d GPU(s) but workflow.gpus_per_chunk is %d", len(assigned), n)
        yield Lease(devices=assigned, source="scheduler")
        return

    devices, origin = (list(visible), "argument") if visible is not None else _detect()
    if not devices:
        log.info("no GPU visible: running on the CPU")
        yield Lease(devices=[], source="cpu")
        return
    if n > len(devices):
        raise ConfigError(
            f"workflow.gpus_per_chunk is {n} but only {len(devices)} GPU(s) are visible ({','.join(devices)}); "
            f"lower workflow.gpus_per_chunk or set {ENV_GPUS}"
        )
    if _cuda_already_initialised():
        log.warning("CUDA is already initialised in this process: the leased CUDA_VISIBLE_DEVICES will not apply")

    ldir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    ldir.mkdir(parents=True, exist_ok=True, mode=0o700)
    t0 = time.monotonic()
    delay = poll
    announced = 0.0
    while True:
        got, locks = _acquire(devices, n, ldir)
        if got:
            break
        waited = time.monotonic() - t0
        if timeout is not None and waited >= timeout:
            held = "; ".join(f"{d}: {_holder(ldir / _lock_name(d))}" for d in devices)
            raise GpuLeaseTimeout(
                f"no {n} free GPU slot(s) among {','.join(devices)} after {waited:.0f}s (lock dir {ldir}; {held})"
            )
        if announced == 0.0 or waited - announced >= 60.0:
            log.info("waiting for %d free GPU slot(s) among %s (lock dir %s)", n, ",".join(devices), ldir)
            announced = max(waited, 1e-9)
        time.sleep(delay if timeout is None else min(delay, max(timeout - waited, 0.01)))
        delay = min(delay * 1.5, max_poll)
    waited = time.monotonic() - t0
    os.environ[CVD] = ",".join(got)
    if origin == "nvidia-smi":
        # nvidia-smi numbers devices in PCI bus order; make CUDA use the same numbering
        os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    log.info("leased GPU(s) %s (waited %.1fs): CUDA_VISIBLE_DEVICES=%s", ",".join(got), waited, os.environ[CVD])
    lease = Lease(devices=got, source="lease", lock_dir=ldir, waited_s=waited, _locks=locks)
    try:
        yield lease
    finally:
        for lock in locks:
            lock.release()
        restore()
