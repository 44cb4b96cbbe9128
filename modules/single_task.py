"""Single-task baseline: one fully independent network per task, nothing shared in the dense part.

The papers' single-task baseline trains ONE task per run; do that by listing a single task in
``data.tasks`` (the config allows one task). With several tasks listed, this module runs them side
by side in one process with no dense parameter shared (only the embedding tables are shared).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from towerrec.modules.mlp import MLP
from towerrec.modules.tower import Tower, check_task_names


class SingleTask(nn.Module):
    """Per task k: ``logit_k = tower_k(MLP_k(x))``; no parameter is shared between tasks.

    Args:
        in_features (int): width of the model input x.
        task_names (Sequence[str]): task names; output keys, in this order (one task for the
            papers' single-task baseline).
        hidden (Sequence[int]): widths of each task's own MLP (``[]``: the tower reads x directly).
        tower_hidden (Sequence[int]): tower MLP widths.
        activation, norm, dropout: forwarded to every MLP.

    Example::

        net = SingleTask(32, ["income"], hidden=[128, 64], tower_hidden=[32])
        logits = net(torch.randn(8, 32))   # {"income": [8]}
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        hidden: Sequence[int] = (128, 64),
        tower_hidden: Sequence[int] = (256, 128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names: List[str] = check_task_names(task_names)
        mlp_kw = dict(activation=activation, norm=norm, dropout=dropout)
        self.in_features = in_features
        self.bottoms = nn.ModuleDict({t: MLP(in_features, hidden, **mlp_kw) for t in self.task_names})
        self.towers = nn.ModuleDict(
            {t: Tower(self.bottoms[t].out_features, tower_hidden, **mlp_kw) for t in self.task_names}
        )

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x [B, in_features] -> {task: logit [B]}``."""
        return {t: self.towers[t](self.bottoms[t](x)) for t in self.task_names}
