"""Shared-Bottom (hard parameter sharing), the baseline of the MMoE and PLE papers.

One MLP on x shared by every task, then one tower per task on its output.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from towerrec.modules.mlp import MLP
from towerrec.modules.tower import Tower, check_task_names


class SharedBottom(nn.Module):
    """``bottom = MLP(x)``; ``logit_k = tower_k(bottom)``.

    Args:
        in_features (int): width of the model input x.
        task_names (Sequence[str]): task names; output keys, in this order.
        bottom_hidden (Sequence[int]): shared MLP widths; the last one is the towers' input width.
        tower_hidden (Sequence[int]): tower MLP widths.
        activation, norm, dropout: forwarded to the bottom and every tower MLP.

    Example::

        net = SharedBottom(32, ["click", "conversion"], bottom_hidden=[128, 64], tower_hidden=[32])
        logits = net(torch.randn(8, 32))   # {"click": [8], "conversion": [8]}
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        bottom_hidden: Sequence[int] = (128, 64),
        tower_hidden: Sequence[int] = (256, 128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names: List[str] = check_task_names(task_names)
        if not bottom_hidden:
            raise ValueError("bottom_hidden needs at least one width")
        mlp_kw = dict(activation=activation, norm=norm, dropout=dropout)
        self.in_features = in_features
        self.bottom = MLP(in_features, bottom_hidden, **mlp_kw)
        width = self.bottom.out_features
        self.towers = nn.ModuleDict({t: Tower(width, tower_hidden, **mlp_kw) for t in self.task_names})

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x [B, in_features] -> {task: logit [B]}``."""
        shared = self.bottom(x)
        return {t: self.towers[t](shared) for t in self.task_names}

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """GradNorm's W (``modules.loss``), the shared block (all its layers): the parameters of
        the bottom MLP."""
        return list(self.bottom.parameters())
