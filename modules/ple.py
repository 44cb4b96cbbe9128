"""CGC and PLE (Progressive Layered Extraction, Tang et al., RecSys 2020).

Layout of one extraction level with K tasks, ``m_k`` experts for task k and ``m_s`` shared experts::

    task gate k : selector = task k's input,   candidates = task k's experts + shared experts
    shared gate : selector = shared input,     candidates = every expert of the level
                  (only on levels before the last; nothing reads it after the last level)

Level 1 feeds ``x`` to every branch; level j > 1 feeds task branch k with ``g_k`` of level j-1 and
the shared branch with ``g_s`` of level j-1. Tower k reads ``g_k`` of the last level.

The experts of a level are one :class:`~towerrec.modules.mlp.StackedMLP` (task 0's experts, task
1's, ..., then the shared ones): each layer of every expert of the level is one kernel.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from towerrec.modules.gate import Gate
from towerrec.modules.mlp import StackedMLP
from towerrec.modules.stacked import part_parameters
from towerrec.modules.tower import Tower, check_task_names


class LevelOutput(NamedTuple):
    """Outputs of one :class:`ExtractionLevel`; weights are ``[B, n]`` per gate."""

    task: List[torch.Tensor]
    shared: Optional[torch.Tensor]
    task_weights: List[torch.Tensor]
    shared_weights: Optional[torch.Tensor]


class LevelGates(NamedTuple):
    """Gate weights of one level, for inspection: ``task[name]`` is ``[B, m_k + m_s]``
    (task k's experts first, then the shared ones); ``shared`` is ``[B, Σm_k + m_s]`` or
    ``None`` on the last level."""

    task: Dict[str, torch.Tensor]
    shared: Optional[torch.Tensor]


class ExtractionLevel(nn.Module):
    """One CGC block: per-task experts, shared experts, a gate per task, optional shared gate.

    The level's ``Σm_k + m_s`` experts are one :class:`StackedMLP`, ``experts``: task 0's ``m_0``
    experts first, then task 1's, ..., then the ``m_s`` shared ones, with the parts ``task`` and
    ``shared`` (the shared experts' parameters stay tensors of their own, GradNorm's shared
    layer). Each expert layer is one GEMM on level 1, where every expert reads x, and one ``bmm``
    on later levels. State-dict keys, per expert layer l: ``experts.linears.l.weight.task
    [Σm_k, width_l, width_{l-1}]``, ``experts.linears.l.weight.shared [m_s, ...]``,
    ``experts.linears.l.bias.task`` / ``.shared`` (and ``experts.norms.l.*`` with a norm).

    Args:
        in_features (int): width of every branch's input at this level.
        experts_per_task (Sequence[int]): ``m_k`` for each task, in task order.
        shared_experts (int): ``m_s``.
        expert_hidden (Sequence[int]): expert MLP widths; the last one is the output width d.
        shared_gate (bool): build the shared gate (every level but the last).
        activation, norm, dropout: the expert MLPs' (see :class:`~towerrec.modules.mlp.MLP`).

    Example::

        level = ExtractionLevel(16, experts_per_task=[1, 2], shared_experts=1, expert_hidden=[8])
        x = torch.randn(4, 16)
        out = level([x, x], x)   # out.task: two [4, 8]; out.shared: [4, 8]
        level.expert(1, 0)       # task 1's first expert as an MLP (a copy)
    """

    def __init__(
        self,
        in_features: int,
        experts_per_task: Sequence[int],
        shared_experts: int,
        expert_hidden: Sequence[int],
        shared_gate: bool = True,
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if any(m < 1 for m in experts_per_task) or shared_experts < 1:
            raise ValueError("every task and the shared branch need at least one expert")
        self.experts_per_task: List[int] = list(experts_per_task)
        self.num_shared_experts = shared_experts
        parts = {"task": sum(self.experts_per_task), "shared": shared_experts}
        self.experts = StackedMLP(parts, in_features, expert_hidden, activation, norm, dropout)
        self.task_gates = nn.ModuleList(Gate(in_features, m + shared_experts) for m in experts_per_task)
        self.shared_gate: Optional[Gate] = (
            Gate(in_features, sum(experts_per_task) + shared_experts) if shared_gate else None
        )
        self.out_features: int = self.experts.out_features
        # Expert ranges: task k's are [starts[k], starts[k] + m_k), the shared ones [num_task, n).
        # Explicit per-task ranges, never a flat index with the task count (the classic bug).
        self.starts: List[int] = [sum(self.experts_per_task[:k]) for k in range(len(self.experts_per_task))]
        self.num_task_experts = parts["task"]
        # The branch each expert reads on levels > 1: task k's experts task k's input, then shared.
        self.branch_of_expert: List[int] = [k for k, m in enumerate(self.experts_per_task) for _ in range(m)]
        self.branch_of_expert += [len(self.experts_per_task)] * shared_experts

    def expert(self, task: Optional[int], index: int) -> nn.Module:
        """A copy of one expert as an :class:`~towerrec.modules.mlp.MLP`: task ``task``'s
        ``index``-th, or the ``index``-th shared expert when ``task`` is None."""
        start = self.num_task_experts if task is None else self.starts[task]
        return self.experts.member(start + index)

    def expert_outputs(self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor) -> torch.Tensor:
        """Every expert's output, ``[Σm_k + m_s, B, d]`` in the order of ``experts``."""
        if all(inp is shared_input for inp in task_inputs):  # level 1: every expert reads x
            return self.experts(shared_input, shared_input=True)
        branches = [*task_inputs, shared_input]
        return self.experts(torch.stack([branches[k] for k in self.branch_of_expert]))

    def forward(self, task_inputs: List[torch.Tensor], shared_input: torch.Tensor) -> LevelOutput:
        """``task_inputs[k]`` feeds task k's experts and gate; ``shared_input`` the shared ones."""
        outs = self.expert_outputs(task_inputs, shared_input)
        # One split, not a slice per gate: its backward is one concatenation, where every slice's
        # backward would fill a zero tensor of all experts' size.
        by_branch = outs.split([*self.experts_per_task, self.num_shared_experts])
        gated: List[torch.Tensor] = []
        task_weights: List[torch.Tensor] = []
        for k, (gate, inp) in enumerate(zip(self.task_gates, task_inputs, strict=True)):
            g, w = gate(inp, torch.cat([by_branch[k], by_branch[-1]]), return_weights=True)
            gated.append(g)
            task_weights.append(w)
        shared: Optional[torch.Tensor] = None
        shared_weights: Optional[torch.Tensor] = None
        if self.shared_gate is not None:
            shared, shared_weights = self.shared_gate(shared_input, outs, return_weights=True)
        return LevelOutput(gated, shared, task_weights, shared_weights)


class PLE(nn.Module):
    """Progressive Layered Extraction: ``num_levels`` extraction levels then one tower per task.

    Args:
        in_features (int): width of the model input x.
        task_names (Sequence[str]): task names; output keys, in this order.
        num_levels (int): extraction levels; 1 is CGC.
        experts_per_task (int | Sequence[int]): ``m_k``, one count for all tasks or one per task.
        shared_experts (int): ``m_s`` per level.
        expert_hidden (Sequence[int]): expert MLP widths (small ReLU MLPs in the paper).
        tower_hidden (Sequence[int]): tower MLP widths.
        activation, norm, dropout: forwarded to every expert and tower MLP.

    Example::

        ple = PLE(32, ["click", "conversion"], num_levels=2, experts_per_task=[1, 2])
        logits = ple(torch.randn(4, 32))              # {"click": [4], "conversion": [4]}
        logits, gates = ple.forward_with_gates(x)     # gates[level].task["click"]: [4, 1 + 1]
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        num_levels: int = 2,
        experts_per_task: Union[int, Sequence[int]] = 1,
        shared_experts: int = 1,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (256, 128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.task_names: List[str] = check_task_names(task_names)
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        if not expert_hidden:
            raise ValueError("expert_hidden needs at least one width")
        counts = (
            [experts_per_task] * len(self.task_names)
            if isinstance(experts_per_task, int)
            else list(experts_per_task)
        )
        if len(counts) != len(self.task_names):
            raise ValueError(f"experts_per_task has {len(counts)} counts for {len(self.task_names)} tasks")
        self.in_features = in_features
        self.experts_per_task: List[int] = counts
        mlp_kw = dict(activation=activation, norm=norm, dropout=dropout)
        levels = []
        width = in_features
        for j in range(num_levels):
            levels.append(
                ExtractionLevel(
                    width,
                    counts,
                    shared_experts,
                    expert_hidden,
                    shared_gate=j < num_levels - 1,
                    **mlp_kw,
                )
            )
            width = levels[-1].out_features
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleDict({t: Tower(width, tower_hidden, **mlp_kw) for t in self.task_names})

    def forward_with_gates(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], List[LevelGates]]:
        """Logits as in :meth:`forward` plus the gate weights of every level."""
        task_inputs = [x] * len(self.task_names)
        shared_input: Optional[torch.Tensor] = x
        gates: List[LevelGates] = []
        for level in self.levels:
            out = level(task_inputs, shared_input)
            task_inputs, shared_input = out.task, out.shared
            gates.append(
                LevelGates(dict(zip(self.task_names, out.task_weights, strict=True)), out.shared_weights)
            )
        logits = {t: self.towers[t](g) for t, g in zip(self.task_names, task_inputs, strict=True)}
        return logits, gates

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``x [B, in_features] -> {task: logit [B]}``."""
        return self.forward_with_gates(x)[0]

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """GradNorm's W (``modules.loss``), the shared block (all its layers): the parameters of
        the last level's shared experts (the ``shared`` part of its stacked experts)."""
        return part_parameters(self.levels[-1].experts, "shared")


class CGC(PLE):
    """Customized Gate Control: a single-level :class:`PLE` (no shared gate).

    Example::

        cgc = CGC(32, ["click", "conversion"], experts_per_task=2, shared_experts=1)
        logits = cgc(torch.randn(4, 32))
    """

    def __init__(self, in_features: int, task_names: Sequence[str], **kwargs) -> None:
        if kwargs.setdefault("num_levels", 1) != 1:
            raise ValueError("CGC has exactly one level; use PLE for more")
        super().__init__(in_features, task_names, **kwargs)
