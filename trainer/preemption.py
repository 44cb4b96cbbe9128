"""Preemption: SIGTERM makes every rank stop at the same step, save a checkpoint and exit 143.

Kubernetes and Slurm send SIGTERM before they kill a job; torch.distributed.run forwards the
SIGTERM it gets to every rank, waits ``--shutdown_timeout`` seconds (default 30, or
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) and then SIGKILLs what is left
(``torch.distributed.elastic.multiprocessing.api.SubprocessContext._close``). Kubernetes waits
``terminationGracePeriodSeconds`` (default 30 s) before its SIGKILL, Slurm ``KillWait`` (default
30 s). ``checkpoint.preemption_grace_s`` (default 25 s) is the time this run allows itself
between the signal and a complete checkpoint; keep it below all of those.

How the ranks agree: the handler only records the signal. Every rank answers "stop requested?"
in the all-reduce that ``distributed.lockstep`` already runs for each batch (training and
evaluation). That all-reduce is in flight while the step before runs and is decided one batch
later, on every rank at the same batch: they all stop after the same step, within two steps of
the signal, without a collective of their own (and, between two training stretches, one blocking
all-reduce stops before training on after a signal during a save or an evaluation). The trainer then
saves (``checkpoint.resume: auto`` resumes it with no step lost; a stop during an evaluation
saves the step it evaluates with the evaluation marked pending, which the resumed run runs first;
during a save, that save completes), and the rank exits with :data:`PREEMPTED_EXIT`.

Example::

    with StopRequest.on_sigterm() as stop:
        for batch in lockstep(iter(loader), group, votes=[stop]):
            ...
        if stop.agreed:
            ...  # every rank stopped before the same batch: save, then raise Preempted
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what a shell and Kubernetes report for a SIGTERM'd process


class Preempted(Exception):
    """Training stopped on a signal after saving what lets the next run continue; the rank exits
    with :data:`PREEMPTED_EXIT`. The message says at which step and what was saved."""


class StopRequest:
    """Whether this rank was asked to stop (:meth:`vote`) and whether every rank agreed to
    (:attr:`agreed`, set by ``lockstep`` on every rank at the same batch)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.agreed = False

    @classmethod
    @contextmanager
    def on_sigterm(cls) -> Iterator["StopRequest"]:
        """A request that SIGTERM sets, for the duration of the block (the previous handler is
        restored after it). Only the main thread can install signal handlers."""
        request = cls()
        previous = signal.signal(signal.SIGTERM, request._handle)
        try:
            yield request
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received_at is None:
            self.signal_name, self.received_at = name, time.monotonic()
            note = "stopping every rank at the next step boundary to save a checkpoint"
        else:
            note = "already stopping"
        # os.write, not logging: a handler may run while the logging lock is held.
        rank = os.environ.get("RANK", "0")
        os.write(2, f"[rank {rank}] {name} received: {note}\n".encode())

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def seconds_since(self) -> float:
        """Seconds since the signal (0 when there was none)."""
        return time.monotonic() - self.received_at if self.received_at is not None else 0.0

    # ---- distributed.StepVote: carried by lockstep's all-reduce ----------------------------

    def vote(self) -> bool:
        return self.requested

    def decide(self, yes: int, world: int) -> bool:
        self.agreed = True
        return True

    def agree(self, group: dist.ProcessGroup | None) -> bool:
        """One all-reduce of the request outside a lockstep (e.g. between training and permutation
        importance); every rank calls it and gets the same answer."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int64)
        if group is not None and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
        self.agreed = self.agreed or bool(flag.item())
        return self.agreed


__all__ = ["PREEMPTED_EXIT", "Preempted", "StopRequest"]
