"""launch.processes on a real process tree shaped like a local job: a launcher, a "rank" in a
session of its own (as torchrun starts ranks) and its "worker" that ignores SIGTERM (as the
DataLoader workers do)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from towerrec.launch import processes

pytestmark = pytest.mark.skipif(not processes.SUPPORTED, reason="needs /proc")

WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])  # ready: SIGTERM is ignored from here on
time.sleep(120)
"""
RANK = f"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", {WORKER!r}, sys.argv[1]])
time.sleep(120)
"""
LAUNCHER = f"""
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", {RANK!r}, sys.argv[1]], start_new_session=True)
time.sleep(120)
"""


@pytest.fixture
def job(tmp_path: Path):
    """(launcher, rank pid, worker pid) once the worker runs; everything is killed after."""
    ready = tmp_path / "worker.pid"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(ready)])
    deadline = time.monotonic() + 30
    while not ready.is_file():
        assert time.monotonic() < deadline, "the process tree did not start"
        time.sleep(0.05)
    worker = int(ready.read_text())
    rank = next(p.pid for p in processes.descendants(launcher.pid) if p.session == p.pid)
    yield launcher, rank, worker
    processes.signal_all(processes.alive_in({rank}), signal.SIGKILL)
    launcher.kill()
    launcher.wait()


def test_the_job_is_the_sessions_its_descendants_lead(job) -> None:
    launcher, rank, worker = job
    assert processes.job_sessions(launcher.pid) == {rank}
    assert {p.pid for p in processes.alive_in({rank})} == {rank, worker}


def test_an_orphaned_worker_is_still_found_by_its_session(job) -> None:
    launcher, rank, worker = job
    sessions = processes.job_sessions(launcher.pid)
    os.kill(rank, signal.SIGKILL)  # the worker's parent dies, as with kill -9
    assert [p.pid for p in processes.wait_gone({rank}, timeout_s=1)] == [worker]
    assert worker not in {p.pid for p in processes.descendants(launcher.pid)}
    assert [p.pid for p in processes.alive_in(sessions)] == [worker]


def test_stop_job_sigterms_then_kills_what_ignores_it(job) -> None:
    launcher, rank, worker = job
    started = time.monotonic()
    killed = processes.stop_job(launcher.pid, grace_s=2)
    assert [p.pid for p in killed] == [worker]  # the rank exited on SIGTERM, the worker ignored it
    assert 2 <= time.monotonic() - started < 10
    assert processes.wait_gone({rank}, timeout_s=5) == []
    assert launcher.poll() is None  # the launcher itself is not part of its job


def test_stop_job_kills_at_once_when_hurried(job) -> None:
    launcher, rank, worker = job
    started = time.monotonic()
    killed = processes.stop_job(launcher.pid, grace_s=60, hurry=lambda: True)
    assert {p.pid for p in killed} >= {worker}
    assert time.monotonic() - started < 5
    assert processes.wait_gone({rank}, timeout_s=5) == []
