"""``towerrec.trainer.main`` whose rank 0 waits after a step for the SIGTERM a test sends.

Example (in place of ``-m towerrec.trainer.main``)::

    python -m torch.distributed.run --nproc_per_node 2 tests/trainer/preempt_main.py 5 MARKER \
        --config CONFIG --set run_dir=RUN_DIR

After its STEP-th training step, rank 0 creates the file MARKER and waits (up to 120 s) until its
SIGTERM handler (``trainer.preemption``) has run. The test sends the signal once MARKER exists,
so the step every rank stops at does not depend on timing.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def wait_for_sigterm_after(step: int, marker: Path) -> None:
    """Make rank 0 pause after training step ``step`` (the lr schedule steps once per step)."""
    from towerrec.trainer.schedules import LRSchedule

    if os.environ.get("RANK") != "0":
        return
    original, taken = LRSchedule.step, [0]

    def step_and_wait(self: LRSchedule) -> None:
        original(self)
        taken[0] += 1
        if taken[0] != step:
            return
        request = signal.getsignal(signal.SIGTERM).__self__  # the StopRequest train() installed
        marker.write_text(f"{step}\n")
        deadline = time.monotonic() + 120
        while not request.requested and time.monotonic() < deadline:
            time.sleep(0.05)

    LRSchedule.step = step_and_wait  # type: ignore[method-assign]


if __name__ == "__main__":
    wait_for_sigterm_after(int(sys.argv[1]), Path(sys.argv[2]))
    from towerrec.trainer.main import main

    sys.exit(main(sys.argv[3:]))
