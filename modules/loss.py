"""Weighted multi-task BCE loss with per-task sample spaces and per-epoch weight decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TaskLossSpec:
    """Loss settings of one binary task.

    Args:
        name (str): task name; key of the logits and labels dicts.
        weight (float): ``ω_k(0)``, the loss weight at epoch 0.
        weight_decay (float): ``γ_k``; the weight at epoch t is ``ω_k(0) · γ_k ** t``.
        pos_weight (float | None): BCE positive-class weight, as in ``BCEWithLogitsLoss``.
        sample_space (str | None): another task's name; only examples whose label for that
            task is 1 count for this task (e.g. conversion on clicked examples).

    Example::

        TaskLossSpec("conversion", weight=1.0, pos_weight=5.0, sample_space="click")
    """

    name: str
    weight: float = 1.0
    weight_decay: float = 1.0
    pos_weight: Optional[float] = None
    sample_space: Optional[str] = None


class MultiTaskLoss(nn.Module):
    """``L = Σ_k ω_k(t) · L_k`` with ``L_k = Σ_i w_ik · BCE_ik / Σ_i w_ik``.

    ``w_ik`` = the batch row weight (1 for a real row, 0 for padding) times, if task k has a
    sample space, ``1[label_{space}(i) == 1]``. A task with no example in its sample space
    contributes 0 (not NaN) and still backpropagates (zero gradients).

    Args:
        specs (Sequence[TaskLossSpec]): one spec per task.

    Example::

        loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
        total, per_task = loss_fn(logits, labels, weights)  # per_task values are detached
        loss_fn.set_epoch(1)                                # ω_k(1) = ω_k(0) · γ_k
    """

    def __init__(self, specs: Sequence[TaskLossSpec]) -> None:
        super().__init__()
        self.specs: List[TaskLossSpec] = list(specs)
        names = [s.name for s in self.specs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"task names must be non-empty and unique, got {names}")
        for s in self.specs:
            if s.sample_space is not None and (s.sample_space not in names or s.sample_space == s.name):
                raise ValueError(f"task {s.name!r}: sample_space {s.sample_space!r} must name another task")
            if s.weight < 0 or s.weight_decay <= 0 or (s.pos_weight is not None and s.pos_weight <= 0):
                raise ValueError(f"task {s.name!r}: need weight >= 0, weight_decay > 0, pos_weight > 0")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select ``ω_k(epoch) = ω_k(0) · γ_k ** epoch`` for the following forward calls."""
        self.epoch = epoch

    def task_weights(self) -> Dict[str, float]:
        """Current ``ω_k(t)`` per task."""
        return {s.name: s.weight * s.weight_decay**self.epoch for s in self.specs}

    def example_weights(
        self, labels: Dict[str, torch.Tensor], weights: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Per-task example weights ``[B]`` (row weight × sample-space indicator).

        The trainer feeds these to its metrics, so AUC is computed on the loss's sample space.
        """
        weights = weights.float()
        out: Dict[str, torch.Tensor] = {}
        for s in self.specs:
            if s.sample_space is None:
                out[s.name] = weights
            else:
                out[s.name] = weights * (labels[s.sample_space] == 1).to(weights.dtype)
        return out

    def forward(
        self,
        logits: Dict[str, torch.Tensor],
        labels: Dict[str, torch.Tensor],
        weights: torch.Tensor,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return ``(total loss, {task: detached L_k})``; logits, labels, weights are ``[B]``."""
        example_weights = self.example_weights(labels, weights)
        omega = self.task_weights()
        total = torch.zeros((), device=weights.device)
        per_task: Dict[str, torch.Tensor] = {}
        for s in self.specs:
            logit = logits[s.name]
            pos_weight = None if s.pos_weight is None else torch.tensor(s.pos_weight, device=logit.device)
            bce = F.binary_cross_entropy_with_logits(
                logit, labels[s.name].to(logit.dtype), pos_weight=pos_weight, reduction="none"
            )
            w = example_weights[s.name].to(logit.dtype)
            # Empty sample space: numerator is exactly 0, so clamping the denominator yields
            # 0 with a live graph; torch.where would leak NaN gradients from the 0/0 branch.
            den = w.sum().clamp(min=torch.finfo(w.dtype).tiny)
            task_loss = (w * bce).sum() / den
            per_task[s.name] = task_loss.detach()
            total = total + omega[s.name] * task_loss
        return total, per_task
