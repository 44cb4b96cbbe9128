"""Stacked modules: ``n`` same-shaped members (experts, FI modules) run as one batched kernel per layer.

MMoE's and PLE's experts and DTN's feature-interaction modules are many small networks of one shape.
Run one by one they are a Python loop of small matmuls; stacked, each layer of all members is one
kernel: a GEMM or ``bmm`` against every member's weights at once (:meth:`StackedLinear.forward`).
What that buys depends on the sizes (``python -m benchmarks.experts``): on the 2-core CPU at batch
2048 the stacked experts of PLE and MMoE and DTN's pair projections are faster than their loops,
while DTN's wide GDCN and MaskNet modules (width 311) are about 10 % slower stacked, as their
loop's one-member activations stay in the L2 cache and the stacked ones do not; on a GPU, where
each of the loop's kernels costs a launch, stacking is the layout that scales.

Layout is member-major: a stacked module maps ``x [B, in]`` read by every member
(``shared_input=True``) or ``x [n, B, in]`` (member i reads ``x[i]``) to ``[n, B, out]``.

Parameters are stacked on a leading member axis. ``parts`` either counts the members (one tensor
per parameter, e.g. ``weight [n, out, in]``) or names contiguous ranges of them
(``{"task": 3, "shared": 1}``: members 0-2, then member 3), one tensor per part (state-dict keys
``weight.task``, ``weight.shared``). Forward concatenates the parts, a copy of the weights that is
small next to the matmul, so one kernel still serves every member, while each part stays a
parameter of its own that can be named alone (:func:`part_parameters`: GradNorm's shared layer).

Every stacked module initialises member i exactly as its single counterpart (``nn.Linear``,
``MLP``, ...) would, draw for draw (``reset_member``), and ``member(i)`` returns that counterpart
holding member i's weights: :func:`unstacked` turns a network back into the loop a stack replaces,
the reference of the tests and benchmarks.

Example::

    experts = StackedLinear({"task": 2, "shared": 1}, 16, 8)
    y = experts(torch.randn(4, 16), shared_input=True)   # [3, 4, 8], one GEMM
    z = experts(torch.randn(3, 4, 16))                   # [3, 4, 8], one bmm
    part_parameters(experts, "shared")                   # [weight.shared, bias.shared]
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# Member count, or named contiguous member ranges in order (one parameter tensor per part).
Parts = Union[int, Mapping[str, int]]
StackedParameter = Union[nn.Parameter, nn.ParameterDict]


def count_members(parts: Parts) -> int:
    """Members in ``parts``; raises ``ValueError`` unless every count is >= 1.

    Example::

        count_members({"task": 3, "shared": 1})  # 4
    """
    counts = {"": parts} if isinstance(parts, int) else dict(parts)
    if not counts or any(n < 1 for n in counts.values()):
        raise ValueError(f"every part needs at least one member, got {parts}")
    return sum(counts.values())


def scale_parts(parts: Parts, factor: int) -> Parts:
    """``parts`` with every count multiplied by ``factor``: the layout of ``factor`` sub-members per
    member (member i's sub-member b is ``i * factor + b``)."""
    return parts * factor if isinstance(parts, int) else {k: n * factor for k, n in parts.items()}


def stacked_parameter(parts: Parts, shape: Sequence[int], fill: Optional[float] = None) -> StackedParameter:
    """A ``[n, *shape]`` parameter, or one ``[n_part, *shape]`` parameter per named part;
    uninitialised unless ``fill`` is given."""

    def make(n: int) -> nn.Parameter:
        data = torch.empty(n, *shape)
        return nn.Parameter(data if fill is None else data.fill_(fill))

    if isinstance(parts, int):
        return make(parts)
    # A list keeps the parts' order (ParameterDict sorts the keys of a plain dict).
    return nn.ParameterDict([(name, make(n)) for name, n in parts.items()])


def joined(param: StackedParameter) -> torch.Tensor:
    """Every member's slice as one ``[n, ...]`` tensor (the parts concatenated in order)."""
    if isinstance(param, nn.ParameterDict):
        values = list(param.values())
        return values[0] if len(values) == 1 else torch.cat(values)
    return param


def member_slice(param: StackedParameter, index: int) -> torch.Tensor:
    """Member ``index``'s slice of ``param`` (a view: writing it writes the parameter)."""
    values = list(param.values()) if isinstance(param, nn.ParameterDict) else [param]
    for value in values:
        if index < value.shape[0]:
            return value[index]
        index -= value.shape[0]
    raise IndexError(f"member index out of range for {sum(v.shape[0] for v in values)} members")


def part_parameters(module: nn.Module, part: str) -> List[nn.Parameter]:
    """The parameters of part ``part`` of every stacked module inside ``module``.

    Example::

        part_parameters(level.experts, "shared")  # the shared experts' weights, biases, norms
    """
    return [p[part] for p in module.modules() if isinstance(p, nn.ParameterDict) and part in p]


def copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` outside autograd (filling a single module from a member)."""
    with torch.no_grad():
        target.copy_(source)


def build_single(
    like: nn.Module, factory: Callable[..., nn.Module], *args: object, **kwargs: object
) -> nn.Module:
    """``factory(*args, **kwargs)`` on the device and in the dtype of ``like``'s parameters, built
    without drawing random numbers (on the meta device, then allocated; the caller fills it).

    Example::

        single = build_single(stack, nn.Linear, 16, 8)  # uninitialised, to be filled with a member
    """
    with torch.device("meta"):
        single = factory(*args, **kwargs)
    reference = next(like.parameters(), None)
    if reference is None:
        return single.to_empty(device="cpu")
    return single.to_empty(device=reference.device).to(reference.dtype)


class Stacked(nn.Module):
    """Base of the stacked modules: ``num_members`` members, initialised member by member.

    Subclasses implement ``reset_member(i)`` (member i drawn as the single module would draw it)
    and ``member(i)`` (that single module, holding member i's weights).
    """

    num_members: int

    def reset_member(self, index: int) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Initialise every member in turn (member 0 fully, then member 1, ...)."""
        for i in range(self.num_members):
            self.reset_member(i)

    def member(self, index: int) -> nn.Module:
        raise NotImplementedError

    def members(self) -> Iterator[nn.Module]:
        return (self.member(i) for i in range(self.num_members))


class StackedLinear(Stacked):
    """``n`` independent ``nn.Linear(in_features, out_features)``, one kernel for all.

    Parameters: ``weight [n, out, in]`` (member i's slice laid out as ``nn.Linear.weight``),
    ``bias [n, out]`` (or per part, see the module docstring); initialised as ``nn.Linear``:
    Kaiming-uniform weight, bias uniform in ``±1/sqrt(in)``.

    Example::

        lin = StackedLinear(3, 16, 8)
        lin(torch.randn(4, 16), shared_input=True).shape  # [3, 4, 8]
        torch.testing.assert_close(lin(x, shared_input=True)[1], lin.member(1)(x))
    """

    def __init__(self, parts: Parts, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_members = count_members(parts)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = stacked_parameter(parts, (out_features, in_features))
        self.bias: Optional[StackedParameter] = stacked_parameter(parts, (out_features,)) if bias else None
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        # nn.Linear.reset_parameters, on member index's slices.
        nn.init.kaiming_uniform_(member_slice(self.weight, index), a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(member_slice(self.bias, index), -bound, bound)

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """``y[i] = x_i @ weight[i].T + bias[i]``, one kernel for all members: ``x [B, in]``
        (``shared_input``: every member reads it) or ``[n, B, in]`` ``-> [n, B, out]``.

        With a shared input, narrowing members (``out < in``) run as one GEMM against the
        members' weights side by side, ``[B, n * out]``, then rearranged to ``[n, B, out]`` (a copy
        of the output, and in backward of its gradient); the others as one ``bmm`` over x
        broadcast to every member (nothing rearranged; backward sums x's gradient over the
        members, a pass over ``[n, B, in]``). Each moves the smaller tensor; measured on GDCN and
        MMoE layers, the other choice is about 10 % slower.
        """
        num, out, inp = self.num_members, self.out_features, self.in_features
        weight = joined(self.weight)
        bias = joined(self.bias) if self.bias is not None else None
        if shared_input and out < inp:
            flat = weight.reshape(num * out, inp).t()
            y = torch.mm(x, flat) if bias is None else torch.addmm(bias.reshape(-1), x, flat)
            # Contiguous [n, B, out]: the elementwise ops that follow, and their backward, cost
            # more on the strided view than the copy does.
            return y.view(x.shape[0], num, out).transpose(0, 1).contiguous()
        if shared_input:
            x = x.expand(num, x.shape[0], inp)
        w = weight.transpose(1, 2)
        return torch.bmm(x, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, w)

    def member(self, index: int) -> nn.Linear:
        single = build_single(
            self, nn.Linear, self.in_features, self.out_features, bias=self.bias is not None
        )
        copy_into(single.weight, member_slice(self.weight, index))
        if self.bias is not None:
            copy_into(single.bias, member_slice(self.bias, index))
        return single


class StackedLowRankLinear(Stacked):
    """``n`` low-rank linears ``y = V (U^T x) + b``, each the ``nn.Sequential(Linear(in -> rank,
    bias=False), Linear(rank -> out))`` it stands for: two :class:`StackedLinear`, ``down`` then ``up``.

    Example::

        lin = StackedLowRankLinear(3, 16, 4, 16)
        y = lin(torch.randn(8, 16), shared_input=True)  # [3, 8, 16]; y[i] == lin.member(i)(x)
    """

    def __init__(
        self, parts: Parts, in_features: int, rank: int, out_features: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.num_members = count_members(parts)
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        with torch.random.fork_rng(devices=[]):  # drawn below, member by member
            self.down = StackedLinear(parts, in_features, rank, bias=False)
            self.up = StackedLinear(parts, rank, out_features, bias=bias)
        self.reset_parameters()

    def reset_member(self, index: int) -> None:
        self.down.reset_member(index)  # the Sequential's construction order
        self.up.reset_member(index)

    def forward(self, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """``x [B, in]`` (``shared_input``) or ``[n, B, in]`` ``-> [n, B, out]``."""
        return self.up(self.down(x, shared_input=shared_input))

    def member(self, index: int) -> nn.Sequential:
        return nn.Sequential(self.down.member(index), self.up.member(index))


class StackedLayerNorm(Stacked):
    """``n`` independent ``nn.LayerNorm(width)`` over the last axis of ``[n, B, width]``, each with
    its own affine ``weight [n, width]`` (ones) and ``bias [n, width]`` (zeros)."""

    def __init__(self, parts: Parts, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_members = count_members(parts)
        self.width = width
        self.eps = eps
        self.weight = stacked_parameter(parts, (width,), fill=1.0)
        self.bias = stacked_parameter(parts, (width,), fill=0.0)

    def reset_member(self, index: int) -> None:
        with torch.no_grad():
            member_slice(self.weight, index).fill_(1.0)
            member_slice(self.bias, index).zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x, (self.width,), None, None, self.eps)
        # Not addcmul: its backward scales by its `value` in extra passes over [n, B, width].
        return normed * joined(self.weight).unsqueeze(1) + joined(self.bias).unsqueeze(1)

    def member(self, index: int) -> nn.LayerNorm:
        single = build_single(self, nn.LayerNorm, self.width, eps=self.eps)
        copy_into(single.weight, member_slice(self.weight, index))
        copy_into(single.bias, member_slice(self.bias, index))
        return single


class StackedBatchNorm(Stacked):
    """``n`` independent ``nn.BatchNorm1d(width)`` on ``[n, B, width]``: statistics per member and
    feature over the batch, running statistics ``running_mean`` / ``running_var [n, width]``
    (buffers, one for all parts), affine ``weight`` / ``bias [n, width]``."""

    def __init__(self, parts: Parts, width: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_members = count_members(parts)
        self.width = width
        self.eps = eps
        self.momentum = momentum
        self.weight = stacked_parameter(parts, (width,), fill=1.0)
        self.bias = stacked_parameter(parts, (width,), fill=0.0)
        self.register_buffer("running_mean", torch.zeros(self.num_members, width))
        self.register_buffer("running_var", torch.ones(self.num_members, width))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_member(self, index: int) -> None:
        with torch.no_grad():
            member_slice(self.weight, index).fill_(1.0)
            member_slice(self.bias, index).zero_()
            self.running_mean[index].zero_()
            self.running_var[index].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One BatchNorm over the n * width columns of [B, n * width]: per member and feature.
        channels = self.num_members * self.width
        flat = x.transpose(0, 1).reshape(-1, channels)
        if self.training:
            self.num_batches_tracked.add_(1)
        normed = F.batch_norm(
            flat,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            joined(self.weight).reshape(-1),
            joined(self.bias).reshape(-1),
            self.training,
            self.momentum,
            self.eps,
        )
        return normed.view(-1, self.num_members, self.width).transpose(0, 1).contiguous()

    def member(self, index: int) -> nn.BatchNorm1d:
        single = build_single(self, nn.BatchNorm1d, self.width, eps=self.eps, momentum=self.momentum)
        copy_into(single.weight, member_slice(self.weight, index))
        copy_into(single.bias, member_slice(self.bias, index))
        copy_into(single.running_mean, self.running_mean[index])
        copy_into(single.running_var, self.running_var[index])
        copy_into(single.num_batches_tracked, self.num_batches_tracked)
        return single


class LoopStack(nn.Module):
    """The loop a stack replaces: its members as separate modules, run one after another and
    stacked to ``[n, B, out]``. A reference for tests and benchmarks, not for training.

    Example::

        loop = LoopStack(list(stack.members()))
        torch.testing.assert_close(loop(x, shared_input=True), stack(x, shared_input=True))
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.num_members = len(self.members)
        self.reads_cross = bool(getattr(self.members[0], "reads_cross", False))

    def forward(
        self, x: torch.Tensor, *inputs: torch.Tensor, shared_input: Optional[bool] = None
    ) -> torch.Tensor:
        """As the stack's forward; ``shared_input`` defaults to ``x`` having no member axis."""
        shared = x.dim() == 2 if shared_input is None else shared_input
        outs = [m(x if shared else x[i], *inputs) for i, m in enumerate(self.members)]
        return torch.stack(outs)


def unstacked(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose stacked modules are :class:`LoopStack` of their members: same
    weights, same outputs, the loop of small matmuls.

    Example::

        loop = unstacked(ple)
        torch.testing.assert_close(loop(x), ple(x))
    """
    result = copy.deepcopy(module)
    if isinstance(result, Stacked):
        return LoopStack(list(result.members()))
    _replace_stacks(result)
    return result


def _replace_stacks(module: nn.Module) -> None:
    replaced: Dict[str, nn.Module] = {}
    for name, child in module.named_children():
        if isinstance(child, Stacked):
            replaced[name] = LoopStack(list(child.members()))
        else:
            _replace_stacks(child)
    for name, loop in replaced.items():
        setattr(module, name, loop)
