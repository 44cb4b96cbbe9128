"""trainer.cpu_share: torch threads given back while other processes busy the rank's cores, and
returned when they go; measured from /proc, with real competing processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from towerrec.trainer.cpu_share import CpuReader, CpuSample, ThreadGovernor, share_of_free_cores
from towerrec.trainer.distributed import available_cores, size_threads

pytestmark = [
    pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux /proc"),
    pytest.mark.serial,  # CPU time and thread counts under the machine's load: alone (make test)
]

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@contextlib.contextmanager
def restored_threads():
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spin_outside(tmp_path: Path) -> int:
    """A process spinning for 60 s that is not this one's descendant (its shell exits): another
    job on the same cores. Its pid."""
    script = tmp_path / "spin.py"
    script.write_text(SPIN)
    out = subprocess.run(
        ["sh", "-c", f"{sys.executable} {script} >/dev/null 2>&1 & echo $!"], capture_output=True
    )
    return int(out.stdout)


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.parametrize(
    ("cores", "others", "ranks", "planned", "current", "threads"),
    [
        (2, 0.1, 1, 2, 2, 2),  # a quiet machine: the plan
        (2, 0.6, 1, 2, 2, 1),  # another job on most of a core
        (2, 1.9, 1, 2, 2, 1),  # never below 1
        (2, 0.4, 1, 2, 1, 1),  # back only for a nearly whole core
        (2, 0.05, 1, 2, 1, 2),
        (8, 4.2, 1, 8, 8, 4),
        (8, 4.0, 2, 4, 4, 2),  # two ranks share what is left
        (8, 0.0, 1, 3, 1, 3),  # never above the plan
    ],
)
def test_share_of_free_cores(cores, others, ranks, planned, current, threads):
    assert share_of_free_cores(cores, others, ranks, planned, current) == threads


def test_the_job_is_the_root_and_its_descendants():
    cpus = os.sched_getaffinity(0)
    mine = CpuReader(cpus, os.getpid())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        outside = CpuReader(cpus, sleeper.pid)  # a job this process is not part of
        a, b = mine.sample(), outside.sample()
        spin(0.5)
        a2, b2 = mine.sample(), outside.sample()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert a2.job - a.job >= 0.4  # this process's spin is its own job's time
    assert b2.job - b.job <= 0.05  # and not the sleeper's
    assert b2.cores_busy - b.cores_busy >= 0.4  # but it kept the cores busy


def test_patience_before_a_change():
    plan = size_threads("auto", local_world_size=1, workers=0, cores=2)
    reader = CpuReader(os.sched_getaffinity(0), os.getpid())
    with restored_threads():
        torch.set_num_threads(plan.intra_op)
        governor = ThreadGovernor(plan, 1, reader, interval=1.0, patience=2)
        base = governor._last
        busy = [CpuSample(base.cores_busy + 1.5 * i, base.job + 0.5 * i, base.at + i) for i in (1, 2)]
        governor.observe(busy[0])  # others kept 1.0 core busy: 1 thread wanted, once
        assert governor.threads == 2
        governor.observe(busy[1])  # twice in a row: given back
        assert governor.threads == 1 and torch.get_num_threads() == 1
        quiet = CpuSample(busy[1].cores_busy + 1.0, busy[1].job + 1.0, busy[1].at + 1)
        governor.observe(quiet)
        assert governor.threads == 1  # one quiet reading is not enough
        governor.observe(CpuSample(quiet.cores_busy + 1.0, quiet.job + 1.0, quiet.at + 1))
        assert governor.threads == 2 and torch.get_num_threads() == 2


def test_auto_only():
    assert ThreadGovernor.for_plan(size_threads(2, local_world_size=1, workers=0, cores=2), 1) is None
    assert ThreadGovernor.for_plan(size_threads("auto", local_world_size=2, workers=0, cores=2), 2) is None


@pytest.mark.skipif(available_cores() < 2, reason="needs 2 cores")
def test_threads_go_while_other_processes_spin_and_come_back(tmp_path: Path):
    cores = available_cores()
    plan = size_threads("auto", local_world_size=1, workers=0, cores=cores)
    reader = CpuReader(os.sched_getaffinity(0), os.getpid())
    with restored_threads():
        torch.set_num_threads(plan.intra_op)
        governor = ThreadGovernor(plan, 1, reader, interval=0.3, patience=2)
        spinners = [spin_outside(tmp_path) for _ in range(cores)]
        try:
            deadline = time.monotonic() + 10
            while governor.threads == plan.intra_op and time.monotonic() < deadline:
                time.sleep(0.05)
                governor.tick()
            assert governor.threads < plan.intra_op and torch.get_num_threads() == governor.threads
        finally:
            for pid in spinners:
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while governor.threads < plan.intra_op and time.monotonic() < deadline:
            time.sleep(0.05)
            governor.tick()
        assert governor.threads == plan.intra_op == torch.get_num_threads()
