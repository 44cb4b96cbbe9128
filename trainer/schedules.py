"""Learning-rate schedules: warmup then constant, step, exponential or cosine decay, by step or
epoch, for the dense optimizer and the tables' optimizers alike.

One ``torch.optim.lr_scheduler.LambdaLR`` per optimizer, all sharing :func:`lr_multiplier`, so
each optimizer's lr is its own configured base lr times the same factor. The fused table
optimizer (``DistributedModelParallel.fused_optimizer``) takes the new lr from its param group:
TorchRec's ``EmbeddingFusedOptimizer.zero_grad``/``step`` hand it to fbgemm, and the train
pipeline calls ``zero_grad`` before each step's backward, where the fused update happens.

Example::

    lrs = {"dense": (dense, 1e-3), "sparse": (dmp.fused_optimizer, 0.05)}   # (optimizer, base lr)
    schedule = LRSchedule(config.training.lr_schedule, lrs, decay_length=160)
    for epoch in range(10):
        schedule.set_epoch(epoch)
        for batch in batches:
            pipeline.progress(batch)   # optimizer.step()
            schedule.step()            # the lr of the next step
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch.optim.lr_scheduler import LambdaLR
from towerrec.trainer.config import LRScheduleConfig


def lr_multiplier(cfg: LRScheduleConfig, step: int, epoch: int, decay_length: int) -> float:
    """The factor of every base lr at training step ``step`` (0-based) of epoch ``epoch``.

    ``decay_length``: the cosine's length in ``cfg.by`` units (``cfg.decay_length`` if set).

    Example::

        cfg = LRScheduleConfig(warmup_steps=2, decay="exponential", gamma=0.5)
        [lr_multiplier(cfg, s, 0, 0) for s in range(4)]   # [0.5, 1.0, 1.0, 0.5]
    """
    warmup = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    t = epoch if cfg.by == "epoch" else max(step - cfg.warmup_steps, 0)
    if cfg.decay == "step":
        assert cfg.step_size is not None and cfg.gamma is not None  # the config's validator
        decay = cfg.gamma ** (t // cfg.step_size)
    elif cfg.decay == "exponential":
        assert cfg.gamma is not None
        decay = cfg.gamma**t
    elif cfg.decay == "cosine":
        length = cfg.decay_length or decay_length
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(t, length) / length))
        decay = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
    else:
        decay = 1.0
    return warmup * decay


def default_decay_length(cfg: LRScheduleConfig, epochs: int, steps_per_epoch: int) -> int:
    """The cosine's default length: the run ``training.epochs`` plans, in ``cfg.by`` units (steps
    less the warmup), at least 1. ``max_steps`` is not part of it: it stops a run, and a run
    stopped and resumed with another ``max_steps`` keeps its schedule."""
    if cfg.by == "epoch":
        return epochs
    return max(epochs * steps_per_epoch - cfg.warmup_steps, 1)


class LRSchedule:
    """One ``LambdaLR`` per optimizer on the shared multiplier; stepped once per training step.

    Args:
        cfg: ``training.lr_schedule``.
        optimizers: ``(optimizer, base lr)`` by name (``dense``, ``sparse``, ...); the base lr
            is the optimizer's configured lr (fbgemm keeps the fused tables' in float32).
        decay_length: see :func:`default_decay_length`.

    ``by: epoch`` decays at epoch starts (:meth:`set_epoch`); the warmup always counts steps.
    Nothing here reads a tensor: no host sync.
    """

    def __init__(
        self,
        cfg: LRScheduleConfig,
        optimizers: Mapping[str, tuple[torch.optim.Optimizer, float]],
        decay_length: int,
    ) -> None:
        self.cfg = cfg
        self.decay_length = decay_length
        self.epoch = 0
        self.schedulers: dict[str, LambdaLR] = {}
        for name, (optimizer, base_lr) in optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = base_lr  # LambdaLR takes it as the group's base
            self.schedulers[name] = LambdaLR(optimizer, self._multiplier)

    def _multiplier(self, step: int) -> float:
        return lr_multiplier(self.cfg, step, self.epoch, self.decay_length)

    def step(self) -> None:
        """After a training step's optimizer step: set the lrs of the next step."""
        for scheduler in self.schedulers.values():
            scheduler.step()

    def set_epoch(self, epoch: int) -> None:
        """Before the first step of ``epoch`` (also of a resumed one): its lrs."""
        self.epoch = epoch
        self._apply()

    def lrs(self) -> dict[str, float]:
        """The lr of each optimizer's first param group, e.g. ``{"dense": 1e-3, "sparse": 0.05}``
        (none for an optimizer without groups: a rank without fused tables)."""
        groups = {name: list(s.optimizer.param_groups) for name, s in self.schedulers.items()}
        return {name: float(g[0]["lr"]) for name, g in groups.items() if g}

    def state_dict(self) -> dict[str, Any]:
        """Every scheduler's ``state_dict`` by name (JSON-ready) and the epoch."""
        return {"epoch": self.epoch, "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was saved (by any rank: ranks hold other fused tables, so
        other param groups, but every scheduler takes the same steps). The base lrs stay this
        run's (its config's). An optimizer the saved run did not have (a data-parallel table
        optimizer after a new sharding plan) continues at the others' step."""
        self.epoch = state["epoch"]
        schedulers = state["schedulers"]
        step = next(iter(schedulers.values()))["last_epoch"]
        for name, scheduler in self.schedulers.items():
            if name not in schedulers:
                scheduler.last_epoch = step
                continue
            saved = dict(schedulers[name])
            for key in ("base_lrs", "_last_lr"):  # one entry per param group: this rank's
                saved.pop(key, None)
            saved["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)  # functions: no state
            scheduler.load_state_dict(saved)
        self._apply()

    def seek(self, step: int, epoch: int) -> None:
        """Continue at training step ``step`` of ``epoch`` without a saved state (a checkpoint
        from before lr schedules): the schedulers are stepped once per step."""
        for scheduler in self.schedulers.values():
            scheduler.last_epoch = step
        self.set_epoch(epoch)

    def _apply(self) -> None:
        """Set every group's lr for the current step and epoch, as ``LambdaLR.get_lr`` does."""
        for scheduler in self.schedulers.values():
            factor = self._multiplier(scheduler.last_epoch)
            lrs = [base * factor for base in scheduler.base_lrs]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs  # get_last_lr(); LambdaLR has no public way to recompute
