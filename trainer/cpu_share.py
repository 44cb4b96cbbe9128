"""Torch threads that give way when other processes run on the rank's cores.

``training.threads: auto`` sizes each rank's intra-op pool to its share of the cores at start
(``trainer.distributed.size_threads``). The share is only the rank's while nothing else runs
there. A second job on the same cores (a shared machine, a node packed past its cores) makes
OpenMP's spinning threads wait for descheduled team mates, and both jobs collapse: two 1-rank
demo jobs with 2 torch threads each on 2 cores fell from ~57,000 to ~1,500 samples/s each, while
with 1 thread each they kept 0.94-0.99 of a lone 1-thread job (``benchmarks.oversubscription``).

:class:`ThreadGovernor` reads, every ``interval`` seconds, the CPU time the rank's cores spent on
processes outside the job (``/proc/stat`` for those cores, less the job's own processes: this
rank, its sibling ranks under the same torchrun agent, their loader workers; a virtual machine's
steal time counts as others' too: a vCPU the host takes away stalls a team as a busy core does)
and sets torch's intra-op threads to this rank's share of the cores left, between 1 and the
planned count. The threads come back when the other load goes (measured on this 2-core VM: while
the host stole most of a core, a 1-rank Census run trained at ~8,000-9,000 samples/s with 2
threads and ~19,000 with 1). A change needs ``patience`` readings in a row, so a
short burst (a compile, a log rotation) changes nothing. Linux only; elsewhere, and with an
explicit ``training.threads: N``, the count stays as planned.

Example::

    governor = ThreadGovernor.for_plan(plan, env.local_world_size)   # None: nothing to govern
    for batch in batches:
        ...
        governor.tick()   # cheap; reads /proc once a second
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from towerrec.trainer.distributed import ThreadPlan

logger = logging.getLogger(__name__)

_PROC = Path("/proc")


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds: ``cores_busy`` of the rank's cores (every process, steal
    included), ``job`` of the job's processes (on any core); ``at``: when read."""

    cores_busy: float
    job: float
    at: float


class CpuReader:
    """Reads :class:`CpuSample` from ``/proc`` for the cores in ``cpus`` and the processes under
    ``root_pid`` (the torchrun agent of a rank, else the rank itself)."""

    def __init__(self, cpus: set[int], root_pid: int, proc: Path = _PROC) -> None:
        self.cpus = cpus
        self.root_pid = root_pid
        self.proc = proc
        self.tick = os.sysconf("SC_CLK_TCK")

    @classmethod
    def for_this_rank(cls) -> "CpuReader":
        cpus = os.sched_getaffinity(0)
        # Under torchrun the agent's children are this node's ranks; elsewhere the parent is a
        # shell or a test runner, not part of the job.
        under_agent = "TORCHELASTIC_RUN_ID" in os.environ
        return cls(set(cpus), os.getppid() if under_agent else os.getpid())

    def sample(self) -> CpuSample:
        return CpuSample(self._cores_busy(), self._job_seconds(), time.monotonic())

    def _cores_busy(self) -> float:
        ticks = 0
        for line in (self.proc / "stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in self.cpus:
                # user nice system idle iowait irq softirq steal: all but idle and iowait
                values = [int(v) for v in fields[:8]]
                ticks += sum(values) - values[3] - values[4]
        return ticks / self.tick

    def _job_seconds(self) -> float:
        return sum(self._process_seconds(pid) for pid in self._descendants(self.root_pid))

    def _descendants(self, pid: int) -> list[int]:
        pids, todo = [], [pid]
        while todo:
            current = todo.pop()
            pids.append(current)
            todo += self._children(current)
        return pids

    def _children(self, pid: int) -> list[int]:
        children: list[int] = []
        try:
            for task in (self.proc / str(pid) / "task").iterdir():
                children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the process ended meanwhile
            pass
        return children

    def _process_seconds(self, pid: int) -> float:
        try:
            stat = (self.proc / str(pid) / "stat").read_text()
        except OSError:
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime


def share_of_free_cores(cores: int, others: float, local_world_size: int, planned: int, current: int) -> int:
    """This rank's intra-op threads when other processes keep ``others`` of the ``cores`` busy:
    its share of what is left, between 1 and ``planned``. Fewer than ``current`` at the nearest
    core; more only for a core that is nearly whole (0.9), so that the threads a loaded machine
    took do not come back to stall again at the next reading.

    Example::

        share_of_free_cores(2, others=1.1, local_world_size=1, planned=2, current=2)   # 1
        share_of_free_cores(2, others=0.4, local_world_size=1, planned=2, current=1)   # 1
        share_of_free_cores(2, others=0.05, local_world_size=1, planned=2, current=1)  # 2
    """
    free = max(0.0, cores - others) / max(1, local_world_size)
    wanted = math.floor(free + 0.5)
    if wanted > current:
        wanted = max(current, math.floor(free + 0.1))
    return max(1, min(planned, wanted))


class ThreadGovernor:
    """Keeps torch's intra-op threads within the cores other processes leave (module docstring)."""

    def __init__(
        self,
        plan: ThreadPlan,
        local_world_size: int,
        reader: CpuReader,
        interval: float = 1.0,
        patience: int = 2,
    ) -> None:
        self.plan = plan
        self.local_world_size = local_world_size
        self.reader = reader
        self.interval = interval
        self.patience = patience
        self.threads = plan.intra_op
        self._last = reader.sample()
        self._proposed, self._streak = self.threads, 0

    @classmethod
    def for_plan(cls, plan: ThreadPlan, local_world_size: int) -> "ThreadGovernor | None":
        """A governor for an ``auto`` plan with more than one thread to give back; else None."""
        if plan.requested != "auto" or plan.intra_op <= 1 or not (_PROC / "stat").is_file():
            return None
        try:
            return cls(plan, local_world_size, CpuReader.for_this_rank())
        except (OSError, ValueError, AttributeError) as e:  # an unusual /proc: keep the plan
            logger.debug("thread governor off: %s", e)
            return None

    def tick(self) -> None:
        """Call once per step (in the thread that runs the model: OpenMP's thread count is per
        calling thread); reads and decides once per ``interval``."""
        if time.monotonic() - self._last.at >= self.interval:
            self.observe(self.reader.sample())

    def observe(self, sample: CpuSample) -> None:
        """Decide from the CPU time since the last sample."""
        elapsed = sample.at - self._last.at
        if elapsed <= 0:
            return
        others = (
            max(0.0, (sample.cores_busy - self._last.cores_busy) - (sample.job - self._last.job)) / elapsed
        )
        self._last = sample
        wanted = share_of_free_cores(
            self.plan.cores, others, self.local_world_size, self.plan.intra_op, self.threads
        )
        if wanted == self.threads:
            self._streak = 0
            return
        self._streak = self._streak + 1 if wanted == self._proposed else 1
        self._proposed = wanted
        if self._streak >= self.patience:
            logger.info(
                "threads: other processes kept %.1f of %d cores busy for the last %d readings; "
                "torch intra-op threads %d -> %d",
                others,
                self.plan.cores,
                self._streak,
                self.threads,
                wanted,
            )
            torch.set_num_threads(wanted)
            self.threads, self._streak = wanted, 0
