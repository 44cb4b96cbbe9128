"""A briefly trained run with its final checkpoint, for the export and predict tests (trained
once per test session, in a spawned one-rank job), and a checkpoint writer for untrained modules."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from dist_utils import run_on_ranks

STEPS = 60  # of 256 rows on one rank (most of an epoch): AUCs well above chance


def _train_and_save(
    rank: int, world_size: int, config_path: str, run_dir: str, extra: tuple[str, ...] = ()
) -> int:
    """Train ``STEPS`` steps; the trainer writes ``checkpoints/step-…`` and ``latest``."""
    from towerrec.trainer.config import load_config
    from towerrec.trainer.distributed import init_distributed
    from towerrec.trainer.train import Trainer

    overrides = [
        f"run_dir={run_dir}",
        "training.batch_size=256",
        f"training.max_steps={STEPS}",
        "training.num_workers=0",
        *extra,
    ]
    config = load_config(config_path, overrides)
    trainer = Trainer(config, init_distributed())
    trainer.fit()  # ends with a checkpoint (trainer.checkpoint)
    return trainer.step


@functools.lru_cache(maxsize=None)
def trained_run(synth_data: Path) -> Path:
    """A run directory next to ``synth_data`` with a checkpoint of a model trained on it."""
    run_dir = synth_data.parent / f"{synth_data.name}-export-run"
    [(status, value)] = run_on_ranks(
        _train_and_save, 1, args=(str(synth_data / "config.yaml"), str(run_dir)), timeout_s=300
    )
    assert status == "ok", value
    return run_dir


@functools.lru_cache(maxsize=None)
def exported(synth_data: Path, quantize: str = "int8") -> tuple[Path, Any]:
    """``(artifact path, CheckReport)`` of the trained run exported with ``quantize``."""
    from towerrec.trainer.export import export_model

    run_dir = trained_run(synth_data)
    out = run_dir / f"model-{quantize}.pt"
    return out, export_model(run_dir, out, quantize=quantize)


def write_checkpoint(run_dir: Path, config: Any, module: Any, step: int = 1) -> None:
    """A plain module's weights in trainer.checkpoint's layout (``model`` entry, meta.json, latest)."""
    import torch.distributed.checkpoint as dcp
    from towerrec.trainer.checkpoint.meta import CheckpointMeta, DataLayout, DataPosition

    name = f"step-{step:08d}"
    directory = run_dir / "checkpoints" / name
    dcp.save({"model": module.state_dict()}, checkpoint_id=str(directory))
    layout = DataLayout(
        world_size=1,
        batch_size=config.training.batch_size,
        num_workers=0,
        shuffle_buffer=0,
        shuffle_row_groups=False,
        seed=0,
        steps_per_epoch=1,
        files=[],
    )
    CheckpointMeta(
        format=1,
        step=step,
        epoch=0,
        batch_in_epoch=0,
        world_size=1,
        config=config.model_dump(mode="json"),
        plan={},
        tables={},  # no table check on load
        sparse_optimizer=config.training.sparse_optimizer.type,
        dense_optimizer=config.training.dense_optimizer.type,
        data=layout,
        data_position=DataPosition(epoch=0, batch=0, batches_per_worker=[0]),
        eval_metrics={},
        saved_at="",
        versions={},
    ).write(directory)
    (run_dir / "checkpoints" / "latest").write_text(name)
