"""Disk faults on real gloo ranks: a failed save that lets the run continue
(``checkpoint.on_save_error: continue``), and a resume whose newest checkpoint is corrupted or
truncated falling back to the previous complete one (``checkpoint.resume_fallback``), saying so.

Every run of both tests goes through one 2-rank job (fixture ``disk_faults``): starting the
ranks costs more than their few steps."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from dist_utils import run_on_ranks

SMALL = ["training.batch_size=512", "training.num_workers=0"]
SAVES = ["checkpoint.interval=2", "checkpoint.keep_last=3"]


class _Warnings(logging.Handler):
    """The towerrec loggers' warnings of this process, as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        logging.getLogger("towerrec").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _save_fails_at_step_4(env: Any, config_path: str, run_dir: str) -> dict[str, Any]:
    import resource

    from towerrec.trainer.config import load_config
    from towerrec.trainer.train import Trainer

    overrides = ["training.max_steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1"]
    config = load_config(
        config_path, [f"run_dir={run_dir}", *SMALL, *overrides, "checkpoint.on_save_error=continue"]
    )
    trainer = Trainer(config, env)
    save, during = trainer.checkpoints.save, {}

    def save_over_a_size_limit(step: int, *args: Any, **kwargs: Any) -> Any:
        if step != 4:
            return save(step, *args, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # `ulimit -f` for this save only
        try:
            return save(step, *args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            during["files"] = sorted(os.listdir(Path(run_dir) / "checkpoints"))

    trainer.checkpoints.save = save_over_a_size_limit
    warnings = _Warnings()
    trainer.fit()
    logging.getLogger("towerrec").removeHandler(warnings)
    return {"step": trainer.step, "warnings": warnings.lines, **during}


def _resume(env: Any, config_path: str, runs: list[tuple[str, list[str]]]) -> list[Any]:
    """Fit each ``(run_dir, overrides)``: the resumed step and the warnings, or the error."""
    from towerrec.trainer.checkpoint import CheckpointError
    from towerrec.trainer.config import load_config
    from towerrec.trainer.train import Trainer

    out: list[Any] = []
    for run_dir, overrides in runs:
        warnings = _Warnings()
        try:
            trainer = Trainer(load_config(config_path, [f"run_dir={run_dir}", *SMALL, *overrides]), env)
            resumed = trainer.resumed.step if trainer.resumed else None
            trainer.fit()
            out.append({"resumed": resumed, "step": trainer.step, "warnings": warnings.lines})
        except CheckpointError as e:
            out.append(f"CheckpointError: {e}")
        logging.getLogger("towerrec").removeHandler(warnings)
    return out


def _flip_bytes(path: Path) -> None:
    """Overwrite 64 bytes in the middle of ``path``: its size stays, its content does not."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(bytes(64))
        f.seek(path.stat().st_size // 2 + 64)
        f.write(b"\xff" * 64)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 100)


# The damaged copies of the source run (4 steps, checkpoints at 2 and 4) the fallback test resumes.
DAMAGED = [  # (run, file of step-00000004, damage, overrides)
    ("corrupted", "__1_0.distcp", _flip_bytes, [*SAVES, "training.max_steps=6"]),
    ("truncated", "__0_0.distcp", _truncate, [*SAVES, "training.max_steps=6"]),
    ("no-fallback", "__1_0.distcp", _flip_bytes, [*SAVES, "checkpoint.resume_fallback=false"]),
]


def _disk_faults(rank: int, world_size: int, config_path: str, root: str) -> dict[str, Any]:
    """Both tests' runs on these ranks: the failed save; then the source run, damaged copies of
    it (rank 0, between barriers), and the resumes of those copies."""
    import torch.distributed as dist
    from towerrec.trainer.distributed import init_distributed

    env = init_distributed()
    failed_save = _save_fails_at_step_4(env, config_path, f"{root}/failed-save")
    [source] = _resume(env, config_path, [(f"{root}/source", [*SAVES, "training.max_steps=4"])])
    dist.barrier()
    if rank == 0:
        for name, file, damage, _ in DAMAGED:
            shutil.copytree(f"{root}/source", f"{root}/{name}")
            damage(Path(root, name, "checkpoints", "step-00000004", file))
    dist.barrier()
    resumed = _resume(env, config_path, [(f"{root}/{name}", overrides) for name, _, _, overrides in DAMAGED])
    return {"failed_save": failed_save, "source": source, "resumed": resumed}


@pytest.fixture(scope="module")
def disk_faults(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The runs' folder and what each rank returned."""
    root = tmp_path_factory.mktemp("disk-faults")
    results = run_on_ranks(_disk_faults, 2, args=(str(synth_data / "config.yaml"), str(root)), timeout_s=300)
    for status, value in results:
        assert status == "ok", value
    return root, [value for _, value in results]


def test_a_failed_save_with_on_save_error_continue_warns_keeps_the_previous_checkpoint_and_trains_on(
    disk_faults: tuple[Path, list[dict]],
) -> None:
    root, ranks = disk_faults
    for value in ranks:
        assert value["failed_save"]["step"] == 6
        # Right after the failed save: keep_last 1 still keeps step 2; nothing of step 4 is left.
        assert value["failed_save"]["files"] == ["latest", "step-00000002"]
    [warning] = [w for w in ranks[0]["failed_save"]["warnings"] if "not saved" in w]
    assert warning.startswith(
        "checkpoint at step 4 not saved; training goes on (checkpoint.on_save_error: continue)"
    )
    # Each rank's error (torch.save's writer reports the refused write in its own words).
    assert "saving checkpoint step-00000004 failed (rank 0: " in warning and "; rank 1: " in warning
    assert "the latest complete checkpoint (step-00000002) is unchanged" in warning
    checkpoints = root / "failed-save" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["latest", "step-00000006"]
    assert (checkpoints / "latest").read_text().strip() == "step-00000006"


def test_resume_falls_back_from_a_corrupted_or_truncated_latest_checkpoint_naming_the_file(
    disk_faults: tuple[Path, list[dict]],
) -> None:
    root, ranks = disk_faults
    for value in ranks:
        assert (value["source"]["resumed"], value["source"]["step"]) == (None, 4)
        corrupted, truncated, refused = value["resumed"]
        assert (corrupted["resumed"], corrupted["step"]) == (2, 6)
        assert (truncated["resumed"], truncated["step"]) == (2, 6)
        assert refused.startswith("CheckpointError: checkpoint ") and "step-00000004 is damaged:" in refused
        assert "__1_0.distcp is corrupted: CRC32 " in refused
        assert "checkpoint.resume_fallback=true would resume from step-00000002 instead" in refused
    corrupted, truncated, _ = ranks[0]["resumed"]
    for outcome, problem in [
        (corrupted, "__1_0.distcp is corrupted: CRC32 "),
        (truncated, "__0_0.distcp is truncated: "),
    ]:
        [warning] = [w for w in outcome["warnings"] if "resume_fallback" in w]
        assert problem in warning and "step-00000004 is damaged" in warning, warning
        assert "resuming from the previous complete checkpoint step-00000002 instead" in warning
        assert "the damaged checkpoint is kept as " in warning and "step-00000004.damaged" in warning
    for name in ("corrupted", "truncated"):
        checkpoints = root / name / "checkpoints"
        assert (checkpoints / "step-00000004.damaged").is_dir()  # kept for inspection
        assert (checkpoints / "latest").read_text().strip() == "step-00000006"
    # Refused: nothing moved, latest still names the damaged checkpoint.
    checkpoints = root / "no-fallback" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000004"
    assert not (checkpoints / "step-00000004.damaged").exists()
