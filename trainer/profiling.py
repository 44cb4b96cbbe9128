"""``training.profile_steps``: a window of training steps under ``torch.profiler``, per rank.

Example::

    # training.profile_steps: [20, 60] -> RUN_DIR/profile/rank0.json, rank1.json, ...
    StepProfiler((20, 60), lambda: trainer.step, run_dir, rank=0).attach(pipeline)

The window is the pipeline calls that produce global steps ``start+1 .. end``: each call fetches
the next batch (loader and lockstep, TorchRec's ``## next_batch ##``), starts its input
all-to-all, and runs the forward, backward and optimizer of the current one, so the window sees
every part of a step and nothing of the set-up. Keep it inside one epoch and between
evaluations (``training.eval_interval``): a pass that falls inside is profiled too. The file holds
``key_averages()`` (inclusive and self CPU time per event name, TorchRec's ``## ... ##`` labels
included) and the window's wall time; ``benchmarks.step_profile`` groups it. It is written after
the window's last step: a run that ends before it writes none.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


class StepProfiler:
    """Profiles the calls of a train step function while the global step (``step()``, the steps
    done before the call) is in ``[start, end)``; writes ``RUN_DIR/profile/rank{rank}.json``."""

    def __init__(
        self, window: Sequence[int], step: Callable[[], int], run_dir: str | Path, rank: int
    ) -> None:
        self.start, self.end = int(window[0]), int(window[1])
        self.step = step
        self.path = Path(run_dir) / "profile" / f"rank{rank}.json"
        self.rank = rank
        self._profile: profile | None = None
        self._steps, self._seconds, self.done = 0, 0.0, False

    def attach(self, pipeline: Any) -> None:
        """Profile ``pipeline.progress`` (a TorchRec train pipeline's step) from now on."""
        pipeline.progress = self.wrap(pipeline.progress)

    def wrap(self, progress: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``progress`` with the profiler started before the window's first step and written
        after its last."""

        def profiled(batches: Any) -> Any:
            step = self.step()
            inside = not self.done and self.start <= step < self.end
            if not inside:
                return progress(batches)
            if self._profile is None:
                cuda = [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
                self._profile = profile(activities=[ProfilerActivity.CPU, *cuda])
                self._profile.__enter__()
            began = time.perf_counter()
            try:
                out = progress(batches)
            finally:
                self._seconds += time.perf_counter() - began
            self._steps += 1
            if step + 1 >= self.end:
                self.finish()
            return out

        return profiled

    def finish(self) -> None:
        """Stop the profiler and write the file (once)."""
        if self._profile is None or self.done:
            return
        self._profile.__exit__(None, None, None)
        self.done = True
        events = [
            {
                "name": e.key,
                "count": e.count,
                "cpu_time_total_us": e.cpu_time_total,
                "self_cpu_time_total_us": e.self_cpu_time_total,
            }
            for e in self._profile.key_averages()
        ]
        payload = {
            "rank": self.rank,
            "window": [self.start, self.end],
            "steps": self._steps,
            "wall_ms": self._seconds * 1e3,
            "threads": torch.get_num_threads(),
            "events": sorted(events, key=lambda e: -e["cpu_time_total_us"]),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(payload, indent=1) + "\n")
        logger.info("profile of steps %d..%d: %s", self.start + 1, self.start + self._steps, self.path)
        self._profile = None
