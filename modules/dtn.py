"""DTN (Deep multiple Task-specific feature interactions Network, Bi et al., arXiv 2408.11611).

Layout with K tasks, M configured FI methods and j instances per method (d = module width)::

    group k (one per task) and the shared group: M * j FI modules each, x -> [B, d], nothing shared
    S_self(k) = GN(group k's modules)
    S_pool(k) = GN(every OTHER task's group's modules + the shared group's modules), where the modules
                of k's parent p (TSN dependency k -> p) are first scaled by sigmoid(logit_p) (detached
                by default)
    tower k   : concat(S_pool, S_self) [B, 2d] or S_pool + S_self [B, d] -> logit k

Tasks are evaluated in dependency order (parents first); the output dict keeps ``task_names`` order.

Each method's modules of every group are one stacked module (``modules.interaction``,
:data:`~towerrec.modules.interaction.STACKED_INTERACTIONS`): each of its layers is one kernel for
all groups and instances, instead of a Python loop of small matmuls.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from towerrec.modules.config import find_dependency_cycle
from towerrec.modules.gate import Gate, mix_candidates
from towerrec.modules.interaction import CrossShape, build_stacked_interaction
from towerrec.modules.stacked import part_parameters
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
        mixed, w = gn(torch.randn(4, 16), torch.randn(3, 4, 8))                   # stacked candidates
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

    def forward(
        self, x: torch.Tensor, candidates: Union[torch.Tensor, List[torch.Tensor]]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mixture [B, d], weights [B, n])`` of ``candidates``, ``[n, B, d]`` or a list of n
        ``[B, d]``."""
        if self.gate is not None:
            return self.gate(x, candidates, return_weights=True)
        assert self.score is not None
        stacked = torch.stack(candidates) if isinstance(candidates, (list, tuple)) else candidates
        weights = torch.softmax(torch.relu(self.score(stacked)).squeeze(-1), dim=0).t()  # [B, n]
        return mix_candidates(weights, stacked), weights


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

    The modules of one method across all groups are one stacked module, ``interactions[method]``
    (``modules.interaction``), with ``(K + 1) * j`` members: task 0's group's j instances, task 1's,
    ..., then the shared group's, in the parts ``task`` (``K * j``) and ``shared`` (``j``; GradNorm's
    shared layer). Its state-dict keys are ``interactions.<method>.<the stacked module's keys>``,
    e.g. ``interactions.gdcn.cross.0.weight.task [K * j, in, in]`` and
    ``interactions.gdcn.cross.0.weight.shared [j, in, in]``; :meth:`fi_module` returns one instance as
    its single FI module.

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
        self.methods: List[str] = list(methods)
        self.instances_per_method = instances_per_method
        self.module_width = module_width
        num_tasks = len(self.task_names)
        parts = {"task": num_tasks * instances_per_method, "shared": instances_per_method}
        with torch.random.fork_rng(devices=[]):  # drawn below, in the order of separate modules
            self.interactions = nn.ModuleDict(
                {
                    m: build_stacked_interaction(m, parts, in_features, module_width, **options[m])
                    for m in methods
                }
            )
        # Group by group (the tasks', then the shared one), method by method, instance by instance:
        # each module drawn as DTN's groups of separate modules drew it.
        for group in range(num_tasks + 1):
            for m in methods:
                for i in range(instances_per_method):
                    self.interactions[m].reset_member(group * instances_per_method + i)
        self.cross_methods: List[str] = [
            m for m in methods if getattr(self.interactions[m], "reads_cross", False)
        ]
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

    def fi_module(self, group: Optional[str], method: str, instance: int = 0) -> nn.Module:
        """A copy of one FI module as its single class (``modules.interaction``): ``instance`` of
        ``method`` in task ``group``'s group, or in the shared group when ``group`` is None.

        Example::

            dtn.fi_module("click", "gdcn")   # GDCN with the click group's weights
        """
        g = len(self.task_names) if group is None else self.task_names.index(group)
        return self.interactions[method].member(g * self.instances_per_method + instance)

    def group_outputs(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every FI module's output, ``[K + 1, M * j, B, d]``: group (the tasks' in ``task_names``
        order, then the shared one), then module in ``self_sources`` order (method, instance)."""
        outs = []
        for m, stack in self.interactions.items():
            if m in self.cross_methods:
                if cross is None:
                    raise ValueError("a memonet module needs the cross codebook vectors; none were given")
                out = stack(x, cross)
            else:
                out = stack(x)
            outs.append(out.view(len(self.task_names) + 1, self.instances_per_method, -1, self.module_width))
        per_group = len(self.methods) * self.instances_per_method
        return torch.stack(outs, dim=1).view(len(self.task_names) + 1, per_group, -1, self.module_width)

    def forward_with_gates(
        self, x: torch.Tensor, cross: Optional[torch.Tensor] = None
    ) -> Tuple[Dict[str, torch.Tensor], DTNTrace]:
        """Logits as in :meth:`forward` plus a :class:`DTNTrace` of every gating network's inputs."""
        logits, trace = self._forward(x, cross, with_trace=True)
        assert trace is not None
        return logits, trace

    def forward(self, x: torch.Tensor, cross: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``x [B, in_features]`` (and the codebook vectors ``cross [B, CrossShape.width]`` for
        ``memonet``) ``-> {task: logit [B]}``."""
        return self._forward(x, cross, with_trace=False)[0]

    def _forward(
        self, x: torch.Tensor, cross: Optional[torch.Tensor], with_trace: bool
    ) -> Tuple[Dict[str, torch.Tensor], Optional[DTNTrace]]:
        # Unbound once (its backward is one stack), not indexed per use (each index's backward
        # fills a zero tensor of every module's size).
        groups = self.group_outputs(x, cross).unbind(0)  # K + 1 of [M * j, B, d]
        outputs = {t: groups[k] for k, t in enumerate(self.task_names)}
        shared_group = groups[-1]
        logits: Dict[str, torch.Tensor] = {}
        self_inputs: Dict[str, torch.Tensor] = {}
        pool_inputs: Dict[str, torch.Tensor] = {}
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
                    pool.append(outputs[other] * prob.view(1, -1, 1))
                else:
                    pool.append(outputs[other])
            pool.append(shared_group)
            self_inputs[t], pool_inputs[t] = outputs[t], torch.cat(pool)
            s_self, self_weights[t] = self.self_gates[t](x, self_inputs[t])
            s_pool, pool_weights[t] = self.pool_gates[t](x, pool_inputs[t])
            h = torch.cat([s_pool, s_self], dim=-1) if self.combine == "concat" else s_pool + s_self
            logits[t] = self.towers[t](h)
        ordered = {t: logits[t] for t in self.task_names}
        if not with_trace:
            return ordered, None
        per_group = len(self.methods) * self.instances_per_method
        trace_groups = {t: _unstack(outputs[t], per_group) for t in self.task_names}
        trace = DTNTrace(
            groups=trace_groups,
            shared=_unstack(shared_group, per_group),
            self_inputs={t: trace_groups[t] for t in self.task_names},
            pool_inputs={t: _unstack(pool_inputs[t], len(self.pool_sources[t])) for t in self.task_names},
            self_weights=self_weights,
            pool_weights=pool_weights,
        )
        return ordered, trace

    def last_shared_parameters(self) -> List[nn.Parameter]:
        """GradNorm's W (``modules.loss``), the shared block (all its layers): the parameters of
        the shared FI group (read by every task's pool gate), the ``shared`` part of every stack."""
        return [p for stack in self.interactions.values() for p in part_parameters(stack, "shared")]


def _unstack(stacked: torch.Tensor, n: int) -> List[torch.Tensor]:
    """``[n, B, d] -> n`` views ``[B, d]``."""
    return [stacked[i] for i in range(n)]
