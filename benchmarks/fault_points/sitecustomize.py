"""Fault points for ``benchmarks.faults``: one rank of a real job pauses at a chosen moment, so that
the harness can SIGKILL (or SIGSTOP) it exactly there.

Python imports ``sitecustomize`` at start-up from ``sys.path``; the harness puts this directory
first on the job's ``PYTHONPATH``. Nothing happens unless ``TOWERREC_FAULT`` is set and
``RANK`` equals ``TOWERREC_FAULT_RANK``::

    TOWERREC_FAULT=checkpoint_write@8 TOWERREC_FAULT_RANK=1 TOWERREC_FAULT_DIR=/tmp/marks \\
        PYTHONPATH=benchmarks/fault_points torchx run ... launch/components.py:train ...

That rank writes ``TOWERREC_FAULT_DIR/<point>.pid`` (its pid) when it reaches the point and then
sleeps until it is signalled. The marker stays, so the restarted ranks pass the point. Every rank
of such a job also prints its Python stacks on ``kill -USR1 PID`` (what is a hung rank doing?).

Points (``@N``):

- ``train_step@N``: after the process's N-th training step (TorchRec ``TrainPipelineSparseDist.progress``)
- ``eval_batch@N``: after the N-th evaluation batch of the process (``TaskMetrics.update``)
- ``checkpoint_write@N``: in the save of global step N, once this rank's data files are written
  (DCP ``FileSystemWriter.write_data``), before DCP's ``.metadata``, meta.json and the rename
- ``checkpoint_finish@N``: in the save of step N on the rank that writes DCP's ``.metadata``
  (rank 0), right after it, before meta.json and the rename (``FileSystemWriter.finish``)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

MAX_PAUSE_S = 600.0  # a point nobody signals must not hang a job forever


def _marker(point: str) -> Path:
    return Path(os.environ["TOWERREC_FAULT_DIR"]) / f"{point}.pid"


def pause(point: str) -> None:
    """Write the marker (atomically: the harness reads a whole pid) and wait to be signalled."""
    marker = _marker(point)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    print(f"[rank {os.environ.get('RANK')}] fault point {point}: pid {os.getpid()} paused", flush=True)
    deadline = time.monotonic() + MAX_PAUSE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    raise RuntimeError(f"fault point {point}: not signalled within {MAX_PAUSE_S:.0f} s")


def _after_call(owner: type, name: str, fires: Callable[[Any, tuple, int], bool], point: str) -> None:
    """Wrap ``owner.name``: after the call, ``pause(point)`` when ``fires(self, args, calls)``."""
    original = getattr(owner, name)
    calls = 0

    def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        result = original(self, *args, **kwargs)
        calls += 1
        if not _marker(point).exists() and fires(self, args, calls):
            if hasattr(result, "wait"):  # DCP's write futures: this rank's files are complete
                result.wait()
            pause(point)
        return result

    setattr(owner, name, wrapper)


def _in_save_of(step: int) -> Callable[[Any, tuple, int], bool]:
    folder = f"step-{step:08d}.tmp"
    return lambda writer, args, calls: Path(str(writer.path)).name == folder


def install(spec: str) -> None:
    """Arm the fault point ``spec`` (``NAME@N``) in this process."""
    name, _, count = spec.partition("@")
    n = int(count)
    if name == "train_step":
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        _after_call(TrainPipelineSparseDist, "progress", lambda s, a, calls: calls == n, spec)
    elif name == "eval_batch":
        from towerrec.trainer.metrics import TaskMetrics

        _after_call(TaskMetrics, "update", lambda s, a, calls: calls == n, spec)
    elif name in ("checkpoint_write", "checkpoint_finish"):
        from torch.distributed.checkpoint import FileSystemWriter

        method = "write_data" if name == "checkpoint_write" else "finish"
        _after_call(FileSystemWriter, method, _in_save_of(n), spec)
    else:
        raise ValueError(f"TOWERREC_FAULT={spec!r}: unknown point {name!r}")


_spec = os.environ.get("TOWERREC_FAULT")
if _spec and "RANK" in os.environ:
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: its stacks, to stderr
    if os.environ["RANK"] == os.environ.get("TOWERREC_FAULT_RANK", "0") and not _marker(_spec).exists():
        install(_spec)
