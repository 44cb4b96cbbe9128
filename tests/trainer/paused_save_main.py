"""``towerrec.trainer.main`` with a pause inside one save, so that a test can kill the job there.

Example (in place of ``-m towerrec.trainer.main``)::

    python -m torch.distributed.run --nproc_per_node 2 tests/trainer/paused_save_main.py 6 120 \
        --config CONFIG --set run_dir=RUN_DIR

Every rank sleeps SECONDS inside the save of global step STEP, after writing its data and before
DCP's ``.metadata``, meta.json and the renames, and prints :data:`PAUSED` when it starts to.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

PAUSED = "test pause inside the save of step"


def pause_inside_save(step: int, seconds: float) -> None:
    """Make DCP's file writer sleep after writing the data of the save of ``step``."""
    from towerrec.trainer.checkpoint import step_dir_name

    write_data = FileSystemWriter.write_data
    paused_dir = f"{step_dir_name(step)}.tmp"

    def paused_write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        result = write_data(self, plan, planner)
        if Path(self.path).name == paused_dir:
            result.wait()  # this rank's data files are complete
            print(f"{PAUSED} {step}", flush=True)
            time.sleep(seconds)
        return result

    FileSystemWriter.write_data = paused_write_data  # type: ignore[method-assign]


if __name__ == "__main__":
    pause_inside_save(int(sys.argv[1]), float(sys.argv[2]))
    from towerrec.trainer.main import main

    sys.exit(main(sys.argv[3:]))
