"""Early stopping on the evaluation set: track one task metric, name the best step, stop after
``patience`` evaluations without an improvement of more than ``min_delta``.

Example::

    stopping = EarlyStopping(config.training.early_stopping, env)   # income.auc, max, patience 3
    improved = stopping.update(step, trainer.evaluate(epoch))       # True: step is the new best
    stopping.best_step, stopping.should_stop, stopping.reason()

Every rank holds the same state: the metric is taken from rank 0 (``TaskMetrics`` computes it
on all ranks from all ranks' examples; the broadcast makes the decision identical bitwise), so
every rank stops at the same step. The state (best value and step, evaluations since the best)
travels in each checkpoint's meta.json (``CheckpointManager``): a resumed run stops where an
uninterrupted one does.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from towerrec.data.config import StrictModel
from towerrec.trainer.config import EarlyStoppingConfig
from towerrec.trainer.distributed import DistEnv

logger = logging.getLogger(__name__)


class EarlyStoppingState(StrictModel):
    """What a checkpoint keeps: the watched ``metric`` and ``mode``, the ``best`` value (None
    before the first evaluation) at global step ``best_step``, and the evaluations since it."""

    metric: str
    mode: str
    best: float | None = None
    best_step: int | None = None
    evaluations_since_best: int = 0


class EarlyStopping:
    """Decides, after each evaluation, whether the step is the new best and whether to stop."""

    def __init__(self, config: EarlyStoppingConfig, env: DistEnv) -> None:
        self.config = config
        self.env = env
        self.task, _, self.name = config.metric.rpartition(".")
        self.state = EarlyStoppingState(metric=config.metric, mode=config.resolved_mode)

    @property
    def best_step(self) -> int | None:
        return self.state.best_step

    @property
    def should_stop(self) -> bool:
        return self.state.evaluations_since_best >= self.config.patience

    def update(self, step: int, metrics: dict[str, dict[str, float]]) -> bool:
        """Record the evaluation after global ``step``; every rank calls it. True if it improved
        on the best by more than ``min_delta`` (the first evaluation always does); a NaN metric
        (an undefined AUC) never improves."""
        value = self._shared(metrics[self.task][self.name])
        best, delta = self.state.best, self.config.min_delta
        if best is None:
            improved = not math.isnan(value)
        elif self.state.mode == "max":
            improved = value > best + delta
        else:
            improved = value < best - delta
        if improved:
            update = {"best": value, "best_step": step, "evaluations_since_best": 0}
        else:
            update = {"evaluations_since_best": self.state.evaluations_since_best + 1}
        self.state = self.state.model_copy(update=update)
        return improved

    def _shared(self, value: float) -> float:
        """Rank 0's value on every rank (float64: the metric is not rounded)."""
        if self.env.world_size == 1 or not dist.is_initialized():
            return value
        box = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(box, src=0, group=self.env.cpu_group)
        return float(box.item())

    def reason(self) -> dict[str, Any]:
        """Why training stops, for the log and metrics.jsonl (phase ``stop``)."""
        return {
            "reason": "early_stopping",
            "metric": self.config.metric,
            "mode": self.state.mode,
            "best": self.state.best,
            "best_step": self.state.best_step,
            "patience": self.config.patience,
            "min_delta": self.config.min_delta,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.state.model_dump(mode="json")

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state; one written for another metric or mode (or none:
        early stopping was off) is dropped with a warning and tracking starts afresh."""
        if saved is None:
            if self.env.is_main:
                logger.warning(
                    "the checkpoint has no early-stopping state: tracking %s from here", self.config.metric
                )
            return
        state = EarlyStoppingState.model_validate(saved)
        if (state.metric, state.mode) != (self.state.metric, self.state.mode):
            if self.env.is_main:
                logger.warning(
                    "the checkpoint tracked %s (%s), this run %s (%s): tracking starts afresh",
                    state.metric,
                    state.mode,
                    self.state.metric,
                    self.state.mode,
                )
            return
        self.state = state
