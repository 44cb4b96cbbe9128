"""benchmarks.ceiling: each train run is compared with the ceiling measured around it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks live beside the installed packages, not in them

from benchmarks.ceiling import Measured, TrainRun, paired_ratios  # noqa: E402


def test_each_run_is_divided_by_the_mean_ceiling_just_before_and_after_it():
    assert paired_ratios([45.0, 60.0], [50.0, 50.0, 70.0]) == pytest.approx([0.9, 1.0])


def test_ceilings_must_surround_every_run():
    with pytest.raises(ValueError, match="2 runs need 3 ceilings"):
        paired_ratios([45.0, 60.0], [50.0, 50.0])


def test_a_drift_of_the_machine_moves_both_sides_of_the_ratio():
    # The machine slows to 0.6 of its speed for a while; the trainer keeps 0.9 of the ceiling
    # whenever the speed holds. Pooled medians put the ceiling in the fast mode (8 of its 12
    # windows) and the runs in the slow one (3 of 5): 0.54. Paired, each steady run keeps 0.9.
    def stretch(speed: float) -> dict[int, list[float]]:
        return {1: [60.0 * speed] * 2, 2: [100.0 * speed] * 2}  # the fastest count is 2 threads

    stretches = [1.0, 1.0, 0.6, 0.6, 1.0, 1.0]
    runs = [TrainRun([90.0 * s] * 3, "threads", Path("log")) for s in [1.0, 0.6, 0.6, 0.6, 1.0]]
    measured = Measured([stretch(s) for s in stretches], runs)
    assert measured.trained / measured.ceiling == pytest.approx(0.54)
    assert measured.round_ratios() == pytest.approx([0.9, 0.675, 0.9, 0.675, 0.9])
    assert measured.ratio == pytest.approx(0.9)
    assert measured.by_threads[2] == [100.0] * 4 + [60.0] * 4 + [100.0] * 4
