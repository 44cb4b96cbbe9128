"""Multi-task BCE loss with per-task sample spaces and a task weighting: fixed weights with the PLE
paper's per-epoch decay, uncertainty weighting (Kendall et al. 2018) or GradNorm (Chen et al. 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
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


WEIGHTINGS = ("fixed", "uncertainty", "gradnorm")


class MultiTaskLoss(nn.Module):
    """``L = Σ_k c_k · L_k (+ terms of the weighting)`` with ``L_k = Σ_i w_ik · BCE_ik / Σ_i w_ik``.

    ``w_ik`` = the batch row weight (1 for a real row, 0 for padding) times, if task k has a
    sample space, ``1[label_{space}(i) == 1]``. A task with no example in its sample space
    contributes 0 (not NaN) and still backpropagates (zero gradients).

    ``weighting`` chooses the task weights ``c_k``:

    * ``fixed``: ``c_k = ω_k(t) = ω_k(0) · γ_k ** epoch`` from the specs (PLE paper's decay).
    * ``uncertainty`` (Kendall, Gal, Cipolla 2018): a learnable ``s_k = log σ_k²`` per task
      (``log_vars``, init 0) and ``L = Σ_k exp(-s_k) · L_k + s_k``: the paper's form without its
      factors 1/2 (the same minimiser ``exp(s_k) = L_k``); ``c_k = exp(-s_k)``, so a task with a
      larger irreducible loss gets a smaller weight.
    * ``gradnorm`` (Chen et al. 2018): learnable ``c_k = w_k`` (``gradnorm_weights``, init 1),
      rescaled to sum to the number of tasks T before each training forward (i.e. after each
      optimizer step). With ``G_k = ||∇_W w_k L_k|| = w_k · ||∇_W L_k||`` at the shared
      parameters W passed to ``forward``, ``r_k = (L_k/L_k(0)) / mean_j(L_j/L_j(0))`` and
      ``L_grad = Σ_k |G_k − mean_j(G_j) · r_k^α|`` (target detached), the returned loss is
      ``Σ_k w_k.detach() · L_k + L_grad``: the network gets ``Σ_k w_k ∇L_k``, and ``w`` only
      ``∇_w L_grad`` (``||∇_W L_k||`` is computed without a graph, so no second-order term
      reaches the network). ``L_k(0)`` is the first training step's loss averaged over ranks
      (buffer ``initial_losses``, checkpointed). In eval mode or without grad it is ``Σ_k c_k L_k``.

    The learnable weights are parameters of this module: the dense optimizer trains them, DDP
    averages their gradients (identical on every rank) and checkpoints hold them.

    Args:
        specs (Sequence[TaskLossSpec]): one spec per task; with a learned weighting, ``weight``
            and ``weight_decay`` must stay 1.
        weighting (str): ``fixed`` | ``uncertainty`` | ``gradnorm``.
        gradnorm_alpha (float): GradNorm's asymmetry α (0: equal gradient norms).

    Example::

        loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
        total, per_task = loss_fn(logits, labels, weights)  # per_task values are detached
        loss_fn.set_epoch(1)                                # ω_k(1) = ω_k(0) · γ_k
        gradnorm = MultiTaskLoss(specs, weighting="gradnorm")
        total, _ = gradnorm(logits, labels, weights, shared=list(bottom.parameters()))
    """

    def __init__(
        self, specs: Sequence[TaskLossSpec], weighting: str = "fixed", gradnorm_alpha: float = 1.5
    ) -> None:
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
            if weighting != "fixed" and (s.weight != 1.0 or s.weight_decay != 1.0):
                raise ValueError(f"task {s.name!r}: weight and weight_decay are for fixed weighting only")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose from {list(WEIGHTINGS)}")
        if gradnorm_alpha < 0:
            raise ValueError(f"gradnorm_alpha must be >= 0, got {gradnorm_alpha}")
        self.weighting = weighting
        self.gradnorm_alpha = gradnorm_alpha
        self.epoch = 0
        num_tasks = len(self.specs)
        if weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(num_tasks))
        elif weighting == "gradnorm":
            self.gradnorm_weights = nn.Parameter(torch.ones(num_tasks))
            # NaN until the first training step sets it.
            self.register_buffer("initial_losses", torch.full((num_tasks,), float("nan")))

    def set_epoch(self, epoch: int) -> None:
        """Select ``ω_k(epoch) = ω_k(0) · γ_k ** epoch`` for the following forward calls."""
        self.epoch = epoch

    def task_weights(self) -> Dict[str, float]:
        """Current ``c_k`` per task: ``ω_k(t)``, ``exp(-s_k)`` or the normalised GradNorm ``w_k``."""
        if self.weighting == "fixed":
            return {s.name: s.weight * s.weight_decay**self.epoch for s in self.specs}
        return {s.name: float(c) for s, c in zip(self.specs, self._learned_weights().detach(), strict=True)}

    def _learned_weights(self) -> torch.Tensor:
        if self.weighting == "uncertainty":
            return torch.exp(-self.log_vars)
        w = self.gradnorm_weights
        return w * (len(self.specs) / w.sum())

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
        shared: Sequence[torch.Tensor] = (),
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Return ``(total loss, {task: detached L_k})``; logits, labels, weights are ``[B]``.

        ``shared``: GradNorm's W, the parameters of the shared block (required by
        ``gradnorm`` in training; ignored otherwise).
        """
        losses = self.task_losses(logits, labels, weights)
        per_task = {name: loss.detach() for name, loss in losses.items()}
        if self.weighting == "fixed":
            omega = self.task_weights()
            total = torch.zeros((), device=weights.device)
            for name, task_loss in losses.items():
                total = total + omega[name] * task_loss
            return total, per_task
        stacked = torch.stack(list(losses.values()))
        if self.weighting == "uncertainty":
            s = self.log_vars
            return (torch.exp(-s) * stacked + s).sum(), per_task
        if not (self.training and torch.is_grad_enabled()):
            return (self._learned_weights() * stacked).sum(), per_task
        return self._gradnorm(list(losses.values()), stacked.detach(), shared), per_task

    def task_losses(
        self, logits: Dict[str, torch.Tensor], labels: Dict[str, torch.Tensor], weights: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """``{task: L_k}`` with their graphs, in spec order."""
        example_weights = self.example_weights(labels, weights)
        losses: Dict[str, torch.Tensor] = {}
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
            losses[s.name] = (w * bce).sum() / den
        return losses

    def _gradnorm(
        self, losses: List[torch.Tensor], detached: torch.Tensor, shared: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``Σ_k w_k.detach() · L_k + L_grad`` (see the class docstring) after renormalising w."""
        if not shared:
            raise ValueError("gradnorm weighting needs the shared parameters W in forward(shared=...)")
        w = self.gradnorm_weights
        with torch.no_grad():  # the renormalisation after the previous optimizer step
            w.mul_(len(self.specs) / w.sum())
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(_mean_over_ranks(detached))
        norms = torch.stack([_grad_norm(loss, shared) for loss in losses])
        grad_norms = w * norms  # G_k; differentiable in w only
        initial = self.initial_losses
        ratios = torch.where(initial > 0, detached / initial, torch.ones_like(detached))
        rates = ratios / ratios.mean()
        target = (grad_norms.mean() * rates**self.gradnorm_alpha).detach()
        gradnorm_loss = (grad_norms - target).abs().sum()
        return (w.detach() * torch.stack(losses)).sum() + gradnorm_loss


def _grad_norm(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||∇_params loss||`` without a graph (the backward pass later reuses ``loss``'s graph)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    squares = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else loss.new_zeros(())


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the default process group (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()
