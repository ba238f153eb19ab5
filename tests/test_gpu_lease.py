"""GPU slot leases (qk_sniffer.chunk.gpu): real processes, real flock on real lock files; no GPU needed.

``QK_SNIFFER_GPUS`` stands in for the GPUs a machine shows, and every test uses its own lock
directory, so the tests behave the same on machines with and without GPUs.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qk_sniffer.chunk.gpu import GpuLeaseTimeout, lease_gpus
from qk_sniffer.config import ConfigError

# A child that leases N slots, prints what it got, and holds the lease until a file appears.
CHILD = r"""
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from qk_sniffer.chunk.gpu import lease_gpus
n, release = int(sys.argv[1]), sys.argv[2]
with lease_gpus(n) as lease:
    print("LEASED", os.environ["CUDA_VISIBLE_DEVICES"], lease.source, flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
print("RELEASED", flush=True)
"""


class Child:
    def __init__(self, tmp: Path, name: str, n: int, gpus: str, lock_dir: Path):
        self.release = tmp / f"release-{name}"
        env = {**os.environ, "QK_SNIFFER_GPUS": gpus, "QK_SNIFFER_GPU_LOCK_DIR": str(lock_dir)}
        env.pop("CUDA_VISIBLE_DEVICES", None)
        env.pop("SLURM_JOB_ID", None)
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(n), str(self.release)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []

    def _read_until(self, stream_name: str, needle: str, timeout: float) -> str:
        stream = getattr(self.proc, stream_name)
        store = self.out if stream_name == "stdout" else self.err
        for line in store:
            if needle in line:
                return line
        sel = selectors.DefaultSelector()
        sel.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    continue
                line = stream.readline()
                if not line:
                    break
                store.append(line)
                if needle in line:
                    return line
        finally:
            sel.unregister(stream)
        raise AssertionError(f"{needle!r} not seen on {stream_name} within {timeout}s; seen {store}")

    def leased(self, timeout: float = 60.0) -> str:
        return self._read_until("stdout", "LEASED", timeout).split()[1]

    def waiting(self, timeout: float = 60.0) -> None:
        self._read_until("stderr", "waiting for", timeout)

    def finish(self) -> None:
        self.release.touch()
        self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def children(tmp_path):
    made: list[Child] = []

    def spawn(name: str, n: int = 1, gpus: str = "0,1") -> Child:
        child = Child(tmp_path, name, n, gpus, tmp_path / "locks")
        made.append(child)
        return child

    yield spawn
    for child in made:
        child.kill()


def test_concurrent_processes_get_distinct_devices_and_a_third_waits(children):
    a, b = children("a"), children("b")
    got = {a.leased(), b.leased()}
    assert got == {"0", "1"}

    c = children("c")
    c.waiting()  # both slots are held: it says so and waits
    assert c.proc.poll() is None and not c.out
    a_dev = a.leased()
    a.finish()
    assert a.proc.returncode == 0
    assert c.leased() == a_dev
    b.finish()
    c.finish()
    assert b.proc.returncode == 0 and c.proc.returncode == 0


def test_sigkilled_holder_releases_its_slot(children):
    holder = children("holder", gpus="0")
    assert holder.leased() == "0"
    waiter = children("waiter", gpus="0")
    waiter.waiting()
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=30)
    assert holder.proc.returncode == -signal.SIGKILL
    assert waiter.leased() == "0"  # the kernel dropped the dead holder's flock
    waiter.finish()


def test_two_slot_job_takes_both_and_others_wait(children):
    both = children("both", n=2)
    assert both.leased() == "0,1"
    single = children("single", n=1)
    single.waiting()
    both.finish()
    assert single.leased() == "0"
    single.finish()


def test_multi_slot_lease_in_process_and_timeout_names_holder(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    locks = tmp_path / "locks"
    with lease_gpus(2, visible=["0", "1", "2"], lock_dir=locks, timeout=10) as lease:
        assert lease.devices == ["0", "1"] and lease.source == "lease"
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
        # flock is per open file: a second lease in the same process competes like another process
        with lease_gpus(1, visible=["0", "1", "2"], lock_dir=locks, timeout=10) as other:
            assert other.devices == ["2"]
            assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
            with pytest.raises(GpuLeaseTimeout, match=f"pid {os.getpid()}"):
                with lease_gpus(1, visible=["0", "1", "2"], lock_dir=locks, timeout=0.5):
                    pass
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # restored after the lease
    with lease_gpus(2, visible=["0", "1", "2"], lock_dir=locks, timeout=5) as again:
        assert again.devices == ["0", "1"]


def test_scheduler_assigned_devices_are_used_as_they_are(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setenv("QK_SNIFFER_GPUS", "0,1")
    locks = tmp_path / "locks"
    with lease_gpus(1, lock_dir=locks, timeout=10) as lease:
        assert lease.source == "scheduler" and lease.devices == ["3"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not locks.exists()  # no lock taken: the scheduler owns the assignment


def test_zero_gpus_per_chunk_forces_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("QK_SNIFFER_GPUS", "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with lease_gpus(0, lock_dir=tmp_path / "locks") as lease:
        assert lease.source == "forced-cpu" and lease.devices == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_no_gpu_runs_on_cpu_without_touching_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QK_SNIFFER_GPUS", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with lease_gpus(1, lock_dir=tmp_path / "locks", timeout=10) as lease:
        assert lease.source == "cpu" and lease.devices == []
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_user_set_visible_devices_are_the_pool(tmp_path, monkeypatch):
    monkeypatch.delenv("QK_SNIFFER_GPUS", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    locks = tmp_path / "locks"
    with lease_gpus(1, lock_dir=locks, timeout=10) as first:
        assert first.devices == ["2"] and os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        os.environ["CUDA_VISIBLE_DEVICES"] = "2,3"  # what another process started by the user sees
        with lease_gpus(1, lock_dir=locks, timeout=10) as second:
            assert second.devices == ["3"] and os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert sorted(p.name for p in locks.iterdir()) == ["gpu-2.lock", "gpu-3.lock"]


def test_more_slots_than_gpus_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="gpus_per_chunk is 3 but only 2 GPU"):
        with lease_gpus(3, visible=["0", "1"], lock_dir=tmp_path / "locks"):
            pass
