"""MMoE (Multi-gate Mixture-of-Experts, Ma et al., KDD 2018), a baseline of the PLE paper.

Layout with K tasks and n shared experts::

    experts   : n MLPs, every one reads x
    gate k    : selector = x, candidates = all n experts (softmax over n)
    tower k   : reads gate k's mixture

The n experts are one :class:`~towerrec.modules.mlp.StackedMLP`: each expert layer is one GEMM for
all of them (every expert reads x).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
from towerrec.modules.gate import Gate
from towerrec.modules.mlp import StackedMLP
from towerrec.modules.tower import Tower, check_task_names


class MMoE(nn.Module):
    """n shared experts, one gate over all of them per task, one tower per task.

    State-dict keys of the experts, per expert layer l: ``experts.linears.l.weight
    [n, width_l, width_{l-1}]``, ``experts.linears.l.bias [n, width_l]`` (and ``experts.norms.l.*``
    with a norm); ``experts.member(i)`` is expert i as an :class:`~towerrec.modules.mlp.MLP`.

    Args:
        in_features (int): width of the model input x.
        task_names (Sequence[str]): task names; output keys, in this order.
        num_experts (int): n. With n == 1 every gate weight is exactly 1 and MMoE degenerates to
            Shared-Bottom (the gates then get no gradient); use n >= 2.
        expert_hidden (Sequence[int]): expert MLP widths; the last one is the mixture width.
        tower_hidden (Sequence[int]): tower MLP widths.
        activation, norm, dropout: forwarded to every expert and tower MLP.

    Example::

        mmoe = MMoE(32, ["click", "conversion"], num_experts=4, expert_hidden=[64])
        logits = mmoe(torch.randn(8, 32))            # {"click": [8], "conversion": [8]}
        logits, gates = mmoe.forward_with_gates(x)   # gates["click"]: [8, 4], rows sum to 1
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (256, 128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names: List[str] = check_task_names(task_names)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not expert_hidden:
            raise ValueError("expert_hidden needs at least one width")
        mlp_kw = dict(activation=activation, norm=norm, dropout=dropout)
        self.in_features = in_features
        self.num_experts = num_experts
        self.experts = StackedMLP(num_experts, in_features, expert_hidden, **mlp_kw)
        width = self.experts.out_features
        self.gates = nn.ModuleDict({t: Gate(in_features, num_experts) for t in self.task_names})
        self.towers = nn.ModuleDict({t: Tower(width, tower_hidden, **mlp_kw) for t in self.task_names})

    def forward_with_gates(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Logits as in :meth:`forward` plus each task's gate weights ``[B, num_experts]``."""
        experts = self.experts(x, shared_input=True)  # [n, B, d]
        logits: Dict[str, torch.Tensor] = {}
        weights: Dict[str, torch.Tensor] = {}
        for t in self.task_names:
            mixed, w = self.gates[t](x, experts, return_weights=True)
            logits[t] = self.towers[t](mixed)
            weights[t] = w
        return logits, weights

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x [B, in_features] -> {task: logit [B]}``."""
        return self.forward_with_gates(x)[0]

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """GradNorm's W (``modules.loss``), the shared block (all its layers): the parameters of
        the experts."""
        return list(self.experts.parameters())
