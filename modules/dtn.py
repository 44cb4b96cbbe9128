"""DTN (Deep multiple Task-specific feature interactions Network, Bi et al., arXiv 2408.11611).

Layout with K tasks, M configured FI methods and j instances per method (d = module width)::

    group k (one per task) and the shared group: M * j FI modules each, x -> [B, d], nothing shared
    S_self(k) = GN(group k's modules)
    S_pool(k) = GN(every OTHER task's group's modules + the shared group's modules), where the modules
                of k's parent p (TSN dependency k -> p) are first scaled by sigmoid(logit_p) (detached
                by default)
    tower k   : concat(S_pool, S_self) [B, 2d] or S_pool + S_self [B, d] -> logit k

Tasks are evaluated in dependency order (parents first); the output dict keeps ``task_names`` order.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from towerrec.modules.config import find_dependency_cycle
from towerrec.modules.gate import Gate
from towerrec.modules.interaction import CrossShape, build_interaction
from towerrec.modules.tower import Tower, check_task_names


def dependency_order(task_names: Sequence[str], dependencies: Mapping[str, str]) -> List[str]:
    """``task_names`` reordered so every parent comes before its child (otherwise stable).

    Raises ``ValueError`` on an unknown task (naming it and the known tasks), a self-dependency or a cycle.

    Example::

        dependency_order(["conversion", "click"], {"conversion": "click"})  # ["click", "conversion"]
    """
    names = list(task_names)
    for child, parent in dependencies.items():
        for role, name in (("task", child), ("parent", parent)):
            if name not in names:
                raise ValueError(f"dependencies: {role} {name!r} of {child!r} is not a task; tasks: {names}")
    cycle = find_dependency_cycle(dependencies)
    if cycle is not None:
        raise ValueError(f"dependencies: cycle {' -> '.join(cycle)}")
    order: List[str] = []
    while len(order) < len(names):
        for t in names:
            if t not in order and (t not in dependencies or dependencies[t] in order):
                order.append(t)
    return order


class GatingNetwork(nn.Module):
    """GN(A): a softmax mixture of ``num_candidates`` module outputs of width d.

    Selectors:
        ``input``: a :class:`Gate` on the model input x scores the candidates (the paper's figure).
        ``self``: each candidate scores itself, ``ReLU(Linear(d -> 1)(candidate))``, softmax across the
            candidates (the authors' code). One scoring Linear per GN, shared by its candidates, so the
            score depends on a module's output, not on its position.

    Example::

        gn = GatingNetwork(16, 3, width=8, selector="self")
        mixed, w = gn(torch.randn(4, 16), [torch.randn(4, 8) for _ in range(3)])  # [4, 8], [4, 3]
    """

    def __init__(self, in_features: int, num_candidates: int, width: int, selector: str = "input") -> None:
        super().__init__()
        if selector not in ("input", "self"):
            raise ValueError(f"unknown gate selector {selector!r}; choose from ['input', 'self']")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.selector = selector
        self.num_candidates = num_candidates
        self.gate: Optional[Gate] = Gate(in_features, num_candidates) if selector == "input" else None
        self.score: Optional[nn.Linear] = nn.Linear(width, 1) if selector == "self" else None

    def forward(self, x: torch.Tensor, candidates: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mixture [B, d], weights [B, n])``."""
        if self.gate is not None:
            return self.gate(x, candidates, return_weights=True)
        assert self.score is not None
        stacked = torch.stack(candidates, dim=1)  # [B, n, d]
        weights = torch.softmax(torch.relu(self.score(stacked)).squeeze(-1), dim=-1)
        return torch.bmm(weights.unsqueeze(1), stacked).squeeze(1), weights


class DTNTrace(NamedTuple):
    """What each gating network received, per task (lists follow :attr:`DTN.self_sources` /
    :attr:`DTN.pool_sources`). ``groups[task]`` / ``shared`` are the raw (unscaled) module outputs."""

    groups: Dict[str, List[torch.Tensor]]
    shared: List[torch.Tensor]
    self_inputs: Dict[str, List[torch.Tensor]]
    pool_inputs: Dict[str, List[torch.Tensor]]
    self_weights: Dict[str, torch.Tensor]
    pool_weights: Dict[str, torch.Tensor]


class DTN(nn.Module):
    """Task-specific FI groups + a shared group, two gating networks and a tower per task, TSN scaling.

    Args:
        in_features (int): width of the model input x.
        task_names (Sequence[str]): task names; output keys, in this order.
        methods (Sequence[str]): FI methods of every group (names of ``INTERACTIONS``).
        module_width (int): d, the output width of every FI module.
        instances_per_method (int): j, instances of each method per group.
        method_options (Mapping[str, dict]): extra constructor arguments per method name.
        gate_selector (str): ``input`` | ``self`` (see :class:`GatingNetwork`).
        dependencies (Mapping[str, str]): TSN, task -> parent task.
        tsn_detach (bool): detach the parent probability that scales its group's outputs.
        combine (str): ``concat`` (tower width 2d) | ``sum`` (tower width d).
        tower_hidden (Sequence[int]): tower MLP widths.
        activation, norm, dropout: forwarded to the towers (and MLP-based FI modules via method_options).
        cross (CrossShape, optional): layout of the cross codebook's vectors, needed by ``memonet``
            modules, which then read ``forward(x, cross)``'s second input.

    Example::

        dtn = DTN(16, ["click", "conversion"], methods=["gdcn", "dcnv2"], module_width=8,
                  dependencies={"conversion": "click"})
        logits = dtn(torch.randn(4, 16))                # {"click": [4], "conversion": [4]}
        logits, trace = dtn.forward_with_gates(x)       # trace.pool_inputs["conversion"], ...
    """

    def __init__(
        self,
        in_features: int,
        task_names: Sequence[str],
        methods: Sequence[str] = ("gdcn", "masknet"),
        module_width: int = 256,
        instances_per_method: int = 1,
        method_options: Optional[Mapping[str, Mapping[str, object]]] = None,
        gate_selector: str = "input",
        dependencies: Optional[Mapping[str, str]] = None,
        tsn_detach: bool = True,
        combine: str = "concat",
        tower_hidden: Sequence[int] = (128, 64),
        activation: str = "relu",
        norm: str = "none",
        dropout: float = 0.0,
        cross: Optional[CrossShape] = None,
    ) -> None:
        super().__init__()
        self.task_names: List[str] = check_task_names(task_names)
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be non-empty and unique, got {list(methods)}")
        if instances_per_method < 1:
            raise ValueError(f"instances_per_method must be >= 1, got {instances_per_method}")
        if combine not in ("concat", "sum"):
            raise ValueError(f"unknown combine {combine!r}; choose from ['concat', 'sum']")
        self.dependencies: Dict[str, str] = dict(dependencies or {})
        self.order: List[str] = dependency_order(self.task_names, self.dependencies)
        self.tsn_detach = tsn_detach
        self.combine = combine
        options = {m: dict((method_options or {}).get(m, {})) for m in methods}
        if "memonet" in options:
            options["memonet"]["cross"] = cross
        names = [f"{m}.{i}" for m in methods for i in range(instances_per_method)]

        def group() -> nn.ModuleList:
            return nn.ModuleList(
                build_interaction(m, in_features, module_width, **options[m])
                for m in methods
                for _ in range(instances_per_method)
            )

        self.task_groups = nn.ModuleDict({t: group() for t in self.task_names})
        self.shared_group = group()
        # Candidate labels "<group>/<method>.<instance>", the shared group as "<shared>" (cannot be a task).
        self.self_sources: Dict[str, List[str]] = {t: [f"{t}/{n}" for n in names] for t in self.task_names}
        self.pool_sources: Dict[str, List[str]] = {
            t: [f"{o}/{n}" for o in self.task_names if o != t for n in names]
            + [f"<shared>/{n}" for n in names]
            for t in self.task_names
        }
        self.self_gates = nn.ModuleDict(
            {t: GatingNetwork(in_features, len(names), module_width, gate_selector) for t in self.task_names}
        )
        self.pool_gates = nn.ModuleDict(
            {
                t: GatingNetwork(in_features, len(self.pool_sources[t]), module_width, gate_selector)
                for t in self.task_names
            }
        )
        tower_in = 2 * module_width if combine == "concat" else module_width
        mlp_kw = dict(activation=activation, norm=norm, dropout=dropout)
        self.towers = nn.ModuleDict({t: Tower(tower_in, tower_hidden, **mlp_kw) for t in self.task_names})

    def forward_with_gates(
        self, x: torch.Tensor, cross: Optional[torch.Tensor] = None
    ) -> Tuple[Dict[str, torch.Tensor], DTNTrace]:
        """Logits as in :meth:`forward` plus a :class:`DTNTrace` of every gating network's inputs."""
        groups = {t: _run_group(self.task_groups[t], x, cross) for t in self.task_names}
        shared = _run_group(self.shared_group, x, cross)
        logits: Dict[str, torch.Tensor] = {}
        self_inputs: Dict[str, List[torch.Tensor]] = {}
        pool_inputs: Dict[str, List[torch.Tensor]] = {}
        self_weights: Dict[str, torch.Tensor] = {}
        pool_weights: Dict[str, torch.Tensor] = {}
        for t in self.order:
            pool: List[torch.Tensor] = []
            for other in self.task_names:
                if other == t:
                    continue
                if self.dependencies.get(t) == other:  # TSN: scale the parent's group by its probability
                    prob = torch.sigmoid(logits[other])
                    if self.tsn_detach:
                        prob = prob.detach()
                    pool += [out * prob.unsqueeze(-1) for out in groups[other]]
                else:
                    pool += groups[other]
            pool += shared
            s_self, self_weights[t] = self.self_gates[t](x, groups[t])
            s_pool, pool_weights[t] = self.pool_gates[t](x, pool)
            h = torch.cat([s_pool, s_self], dim=-1) if self.combine == "concat" else s_pool + s_self
            logits[t] = self.towers[t](h)
            self_inputs[t], pool_inputs[t] = groups[t], pool
        ordered = {t: logits[t] for t in self.task_names}
        trace = DTNTrace(groups, shared, self_inputs, pool_inputs, self_weights, pool_weights)
        return ordered, trace

    def forward(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``x [B, in_features]`` (and the codebook vectors ``cross [B, CrossShape.width]`` for
        ``memonet``) ``-> {task: logit [B]}``."""
        return self.forward_with_gates(x, cross)[0]

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """GradNorm's W (``modules.loss``), the shared block (all its layers): the parameters of
        the shared FI group (read by every task's pool gate)."""
        return list(self.shared_group.parameters())


def _run_group(group: nn.ModuleList, x: torch.Tensor, cross: Optional[torch.Tensor]) -> List[torch.Tensor]:
    outputs = []
    for module in group:
        if getattr(module, "reads_cross", False):
            if cross is None:
                raise ValueError("a memonet module needs the cross codebook vectors; none were given")
            outputs.append(module(x, cross))
        else:
            outputs.append(module(x))
    return outputs
