"""The processes of a local job, found through ``/proc``: what ``towerrec train`` stops on Ctrl-C.

torchx's local scheduler starts each replica (bash, then the torchrun agent) in a session of its
own, and torchrun starts each rank in another (``start_new_session``), with the rank's DataLoader
workers in the rank's session. So "the job" is every session that a descendant of the launcher
leads; a rank whose agent died is still found by its session, and so are its workers.

Example::

    sessions = job_sessions(os.getpid())     # {agent session, rank 0's, rank 1's}
    alive_in(sessions)                       # the processes still running in them
    stop_job(os.getpid(), grace_s=40)        # SIGTERM them all, SIGKILL what is left after 40 s

Linux only (``/proc``); elsewhere :data:`SUPPORTED` is False and every function finds nothing.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PROC = Path("/proc")
SUPPORTED = PROC.joinpath("self", "stat").is_file()


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    session: int
    state: str  # R running, S sleeping, T stopped, Z zombie, ...
    command: str


def read_process(pid: int) -> ProcessInfo | None:
    """``/proc/PID/stat`` and its command line; None if the process is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
        cmdline = (PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
    fields = stat[stat.rindex(")") + 2 :].split()
    command = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return ProcessInfo(pid, int(fields[1]), int(fields[3]), fields[0], command)


def all_processes() -> list[ProcessInfo]:
    if not SUPPORTED:
        return []
    infos = (read_process(int(p.name)) for p in PROC.iterdir() if p.name.isdigit())
    return [info for info in infos if info is not None]


def descendants(root: int) -> list[ProcessInfo]:
    """Every living descendant of ``root`` (children, their children, ...)."""
    children: dict[int, list[ProcessInfo]] = {}
    for info in all_processes():
        children.setdefault(info.ppid, []).append(info)
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found


def job_sessions(launcher: int) -> set[int]:
    """The sessions led by descendants of ``launcher``: its replicas' and their ranks'."""
    return {p.session for p in descendants(launcher) if p.session == p.pid}


def alive_in(sessions: set[int]) -> list[ProcessInfo]:
    """The processes (not zombies) of ``sessions``, wherever they were reparented."""
    return [p for p in all_processes() if p.session in sessions and p.state != "Z"]


def signal_all(processes: list[ProcessInfo], sig: signal.Signals) -> None:
    for process in processes:
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(sessions: set[int], timeout_s: float, poll_s: float = 0.2) -> list[ProcessInfo]:
    """Wait until no process of ``sessions`` is left, at most ``timeout_s``; what is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = alive_in(sessions)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def stop_job(launcher: int, grace_s: float, hurry: Callable[[], bool] = lambda: False) -> list[ProcessInfo]:
    """SIGTERM every session of the job ``launcher`` started (replicas, torchrun agents, ranks;
    the ranks' DataLoader workers ignore it), wait up to ``grace_s`` for all of them to exit,
    then SIGKILL what is left, at once if ``hurry()`` turns true. Returns the processes killed.

    SIGTERM is what Kubernetes and Slurm send: the agents forward it to their ranks and the ranks
    stop at a step boundary and save (``trainer.preemption``).
    """
    sessions = job_sessions(launcher)
    for leader in sessions:
        try:
            os.killpg(leader, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not hurry():
        sessions |= job_sessions(launcher)  # ranks an agent started meanwhile
        if not alive_in(sessions):
            return []
        time.sleep(0.2)
    left = alive_in(sessions | job_sessions(launcher))
    signal_all(left, signal.SIGKILL)
    return left
