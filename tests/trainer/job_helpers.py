"""A real 2-rank ``torch.distributed.run`` job for tests that fault it: its log, a file size
limit, another entry script, and signals to every process of it.

Example::

    proc = torchrun_job(config, ["training.max_steps=9"], tmp_path / "job.log")
    signal_tree(proc.pid, signal.SIGTERM)   # torchrun, both ranks, their loader workers
    assert proc.wait(timeout=120) == 1
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]


def torchrun_job(
    config: Path,
    overrides: list[str],
    log: Path,
    script: list[str] | None = None,
    max_file_bytes: int | None = None,
) -> subprocess.Popen:
    """``towerrec.trainer.main`` on 2 ranks, output to ``log``; ``script``: ``[path, *args]`` run
    instead (a wrapper of main, e.g. tests/trainer/paused_save_main.py); ``max_file_bytes``: the
    job's file size limit (``ulimit -f``), a disk that refuses large writes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port())]
    cmd += ["-m", "towerrec.trainer.main"] if script is None else script
    cmd += ["--config", str(config)]
    for override in overrides:
        cmd += ["--set", override]
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if max_file_bytes is None else lambda: _limit_file_size(max_file_bytes),
        )


def _limit_file_size(size: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def signal_tree(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid`` and every process below it: torchrun starts each rank in a session
    of its own, so the ranks (and their loader workers) are not in torchrun's process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass
