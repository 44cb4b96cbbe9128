"""The training state beside the weights: RNG states, the data position, and where a resumed
run continues.

Example::

    layout = data_layout(train_set, config.training.num_workers)
    saved = rank_state(rank, train_set, layout, epoch, batch)     # ranks.<r> entry, JSON-ready
    set_rng_state(saved["rng"])                                   # same world size only
    point = resume_point(meta, layout, world_size, log=rank == 0)

Data position: with the same world size, batch size, workers, shuffle settings and data files,
every rank continues its epoch at the batch after the checkpoint (``ParquetDataset.set_epoch``
with ``start_batch``), so no example is repeated or skipped, and RNG states are restored per rank:
the continuation is bitwise identical to an uninterrupted run on CPU. Otherwise (resharding to
another world size, say) the ranks' row ranges differ and the consumed rows cannot be mapped
exactly: a checkpoint at an epoch boundary continues exactly at the next epoch; one inside an
epoch continues at the same fraction of it (batch ``round(k * S_new / S_old)``), so rows near the
old and new rank boundaries may be repeated or skipped once. Both cases are logged as a warning.
RNG states are restored only on the same world size (they are per rank); otherwise each rank
keeps the seeded state of a fresh run. The global step continues from the checkpoint's.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from towerrec.data.parquet import ParquetDataset, resume_plan
from towerrec.trainer.checkpoint.meta import CheckpointMeta, DataLayout

logger = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and python RNG states, JSON-ready."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(words), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states :func:`rng_state` gave."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, words, gauss_next = state["python"]
    random.setstate((version, tuple(words), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def data_layout(dataset: ParquetDataset, num_workers: int) -> DataLayout:
    """The layout of ``dataset``'s epochs read by ``num_workers`` DataLoader workers."""
    return DataLayout(
        world_size=dataset.world_size,
        batch_size=dataset.batch_size,
        num_workers=num_workers,
        shuffle_buffer=dataset.shuffle_buffer,
        shuffle_row_groups=dataset.shuffle_row_groups,
        seed=dataset.seed,
        steps_per_epoch=dataset.steps_per_epoch(),
        files=[(Path(i.path).name, list(i.row_groups)) for i in dataset.infos],
    )


def rank_state(
    rank: int, dataset: ParquetDataset, layout: DataLayout, epoch: int, batch: int
) -> dict[str, Any]:
    """Rank ``rank``'s RNG states and data position after ``batch`` batches of ``epoch``."""
    next_worker, taken = resume_plan(layout.steps_per_epoch, layout.num_workers, batch)
    start, end = dataset.rank_rows()
    return {
        "rank": rank,
        "rng": rng_state(),
        "data": {
            "epoch": epoch,
            "batch": batch,
            "rows": [start, end],
            "batches_per_worker": taken,
            "next_worker": next_worker,
        },
    }


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: global ``step``; batch ``batch`` of epoch ``epoch``.
    ``eval_pending``: the evaluation due at ``step`` was interrupted (a preemption); run it first."""

    step: int
    epoch: int
    batch: int
    eval_metrics: dict[str, Any]
    exact: bool
    checkpoint: Path
    eval_pending: bool = False


def resume_point(meta: CheckpointMeta, layout: DataLayout, world_size: int, log: bool) -> ResumePoint:
    """Where the data continues after checkpoint ``meta`` under this run's ``layout`` and
    ``world_size`` (policy: module docstring); ``log``: warn about an approximation."""
    saved = meta.data
    epoch, batch = meta.epoch, meta.batch_in_epoch
    exact = saved == layout
    if not exact:
        changed = sorted(k for k in DataLayout.model_fields if getattr(saved, k) != getattr(layout, k))
        old_steps, new_steps = saved.steps_per_epoch or 1, layout.steps_per_epoch
        if batch:
            new_batch = round(batch * new_steps / old_steps)
            if log:
                logger.warning(
                    "the data layout changed (%s): the consumed rows of epoch %d cannot be mapped "
                    "exactly; continuing at the same fraction of it: batch %d of %d (was %d of %d); "
                    "rows near the old and new rank (or worker) boundaries may be seen twice or "
                    "not at all in this epoch",
                    ", ".join(changed),
                    epoch,
                    new_batch,
                    new_steps,
                    batch,
                    old_steps,
                )
            batch = new_batch
            if batch >= new_steps:
                epoch, batch = epoch + 1, 0
        elif log:
            logger.warning(
                "the data layout changed (%s); the checkpoint is at an epoch boundary, so epoch %d "
                "starts as usual",
                ", ".join(changed),
                epoch,
            )
        if meta.world_size != world_size and log:
            logger.warning(
                "world size %d -> %d: RNG states are not restored (they are per rank)",
                meta.world_size,
                world_size,
            )
    # At an epoch boundary nothing needs mapping: the position is exact whatever the layout.
    exact = exact or meta.batch_in_epoch == 0
    return ResumePoint(meta.step, epoch, batch, meta.eval_metrics, exact, meta.path, meta.eval_pending)
