"""Per-task tower: MLP then a single logit."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from towerrec.modules.mlp import MLP


def check_task_names(task_names: Sequence[str]) -> List[str]:
    """``task_names`` as a list; raises ``ValueError`` unless it is non-empty and unique."""
    names = list(task_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"task_names must be non-empty and unique, got {names}")
    return names


class Tower(nn.Module):
    """``MLP(hidden) -> Linear(-> 1)``; returns the task logit (probability = sigmoid(logit)).

    Args:
        in_features (int): input width.
        hidden (Sequence[int]): MLP widths; ``[]`` makes the tower a logistic regression.
        activation, norm, dropout: forwarded to :class:`MLP`.

    Example::

        tower = Tower(64, hidden=[32, 16])
        logit = tower(torch.randn(4, 64))  # [4]
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (256, 128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.mlp = MLP(in_features, hidden, activation=activation, norm=norm, dropout=dropout)
        self.logit = nn.Linear(self.mlp.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_features] -> [B]`` logits."""
        return self.logit(self.mlp(x)).squeeze(-1)
