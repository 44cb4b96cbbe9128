"""trainer.distributed.size_threads / set_threads / available_cores: a rank's threads fit its cores."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from towerrec.trainer.config import ConfigError, load_config
from towerrec.trainer.distributed import available_cores, set_threads, size_threads


@pytest.mark.parametrize(
    ("cores", "ranks", "workers", "intra", "arrow"),
    [
        (2, 1, 1, 1, 1),  # this machine: one rank, one worker
        (2, 1, 0, 2, 1),  # no worker: the loop converts between steps, every core computes
        (8, 1, 2, 6, 2),
        (8, 2, 1, 3, 1),  # 2 x (3 + 1) = 8
        (16, 4, 0, 4, 1),
        (2, 2, 1, 1, 1),  # no core left for compute: still 1 thread
        (3, 2, 0, 1, 1),  # 3 // 2 = 1 core per rank
    ],
)
def test_auto_fits_ranks_and_workers_to_the_cores(cores, ranks, workers, intra, arrow):
    plan = size_threads("auto", local_world_size=ranks, workers=workers, cores=cores)
    assert (plan.intra_op, plan.interop, plan.arrow) == (intra, intra, arrow)
    fits = ranks * (1 + workers) <= cores  # when 1 thread beside the workers fits, auto fits
    assert (plan.busy <= cores) == fits
    assert (plan.oversubscription() is None) == fits


def test_auto_that_cannot_fit_says_so_in_the_start_line_without_a_warning(caplog):
    plan = size_threads("auto", local_world_size=2, workers=1, cores=2)
    with _restored_threads(), caplog.at_level(logging.INFO, logger="towerrec"):
        set_threads(plan)
    [line] = [r for r in caplog.records if r.name == "towerrec.trainer.distributed"]
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        "threads: 2 cores available, 2 local rank(s), each 1 intra-op + 1 inter-op torch threads, "
        "1 loader workers, 1 Arrow decode threads (training.threads: auto; 4 busy on 2 cores: more "
        "than the cores)"
    )


def test_an_explicit_count_is_used_and_warns_when_it_oversubscribes(caplog):
    plan = size_threads(4, local_world_size=1, workers=1, cores=2)
    assert plan.intra_op == 4 and plan.requested == 4
    with _restored_threads(), caplog.at_level(logging.INFO, logger="towerrec"):
        set_threads(plan)
        assert torch.get_num_threads() == 4
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == (
        "training.threads: 4: 1 local rank(s) x (4 intra-op threads + 1 loader workers) = 5 busy on 2 "
        "cores: they take turns on the cores and training slows down, most when another process is "
        "busy; use auto or at most 1"
    )
    caplog.clear()
    with _restored_threads(), caplog.at_level(logging.INFO, logger="towerrec"):
        set_threads(size_threads(3, local_world_size=2, workers=1, cores=8))  # 2 x (3 + 1) = 8: fits
    assert [r.levelno for r in caplog.records] == [logging.INFO]


def test_set_threads_sizes_torch_and_arrow_and_is_silent_unless_asked(caplog):
    with _restored_threads(), caplog.at_level(logging.INFO, logger="towerrec"):
        set_threads(size_threads(1, local_world_size=1, workers=0, cores=4), announce=False)
        assert torch.get_num_threads() == 1
        assert pa.cpu_count() == 3  # the rank's cores the torch threads leave
    assert caplog.records == []


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_available_cores_follow_the_affinity_mask():
    mask = os.sched_getaffinity(0)
    assert available_cores() == len(mask) or _has_cpu_quota()
    one = {min(mask)}
    os.sched_setaffinity(0, one)  # what `taskset -c N` or a cpuset does
    try:
        assert available_cores() == 1
        assert size_threads("auto", local_world_size=1, workers=1).intra_op == 1
    finally:
        os.sched_setaffinity(0, mask)
    assert os.sched_getaffinity(0) == mask


def test_a_cgroup_cpu_quota_caps_the_cores(tmp_path: Path):
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")  # no limit
    assert available_cores(str(v2)) == mask
    (v2 / "cpu.max").write_text("50000 100000\n")  # half a core: at least 1
    assert available_cores(str(v2)) == 1
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(str(v1)) == mask
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # one core
    assert available_cores(str(v1)) == 1
    assert available_cores(str(tmp_path / "none")) == mask  # no cgroup files: the affinity


def test_config_threads_and_profile_steps(tmp_path: Path):
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    loaded = load_config(config)
    assert loaded.training.threads == "auto" and loaded.training.profile_steps is None
    loaded = load_config(config, ["training.threads=3", "training.profile_steps=[10, 20]"])
    assert loaded.training.threads == 3 and loaded.training.profile_steps == [10, 20]
    for override, expected in [
        ("training.threads=0", "training.threads.constrained-int: Input should be greater than 0"),
        ("training.threads=all", "training.threads.literal['auto']: Input should be 'auto'"),
        (
            "training.profile_steps=[20, 10]",
            "profile_steps: [20, 10]; expected [start, end] with start < end",
        ),
        ("training.profile_steps=[5]", "training.profile_steps: List should have at least 2 items"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(config, [override])
        assert expected in str(error.value)


def _has_cpu_quota() -> bool:
    return available_cores() < len(os.sched_getaffinity(0))


class _restored_threads:
    """Put torch's and Arrow's pool sizes back after a test changed them."""

    def __enter__(self) -> None:
        self.torch, self.arrow = torch.get_num_threads(), pa.cpu_count()

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.torch)
        pa.set_cpu_count(self.arrow)
