"""Stacked experts and FI modules: one kernel per layer, the math of the loop of single modules.

Every stacked module is compared with the modules it replaces (``member(i)``: nn.Linear, MLP, GDCN,
... holding member i's weights), outputs and gradients, and every model family with its
:func:`unstacked` copy (the same network run as a loop of those single modules). The comparisons
run in float64, so a tolerance far below float32 rounding still separates "the same math in
another order" from a different formula.
"""

import copy
from typing import Dict

import pytest
import torch
import torch.nn as nn
from towerrec.modules.dtn import DTN
from towerrec.modules.interaction import (
    INTERACTIONS,
    STACKED_INTERACTIONS,
    CrossShape,
    build_interaction,
    build_stacked_interaction,
)
from towerrec.modules.loss import _grad_norm
from towerrec.modules.mlp import MLP, StackedMLP
from towerrec.modules.mmoe import MMoE
from towerrec.modules.ple import CGC, PLE
from towerrec.modules.stacked import (
    LoopStack,
    Stacked,
    StackedLinear,
    StackedLowRankLinear,
    count_members,
    part_parameters,
    unstacked,
)

PARTS = {"task": 3, "shared": 2}
N = 5
IN, OUT, B = 6, 4, 7
TOL = {"atol": 1e-9, "rtol": 1e-7}  # float64
SHAPE = CrossShape(num_pairs=3, num_hashes=2, dim=4)
OPTIONS: Dict[str, dict] = {
    "gdcn": {"num_layers": 2},
    "dcnv2": {"num_layers": 2},
    "masknet": {"num_blocks": 2, "block_width": 3, "hidden": [5]},
    "mlp": {"hidden": [5, 3]},
    "memonet": {"cross": SHAPE},
}
# Every method at OPTIONS, and the narrowed forms: low-rank GDCN, MaskNet with a narrow mask.
CASES = [(m, OPTIONS[m]) for m in sorted(OPTIONS)] + [
    ("gdcn", {"num_layers": 2, "rank": 2}),
    ("masknet", {**OPTIONS["masknet"], "mask_width": 2}),
]


def _inputs(method: str):
    x = torch.randn(B, IN, dtype=torch.float64, requires_grad=True)
    if method != "memonet":
        return (x,)
    return x, torch.randn(B, SHAPE.width, dtype=torch.float64, requires_grad=True)


def _member_grads(stacked: Stacked, index: int) -> Dict[str, torch.Tensor]:
    """Member ``index``'s gradients in its single module's layout (``member`` applied to a copy
    holding the gradients in place of the weights)."""
    grads = copy.deepcopy(stacked)
    with torch.no_grad():
        for g, p in zip(grads.parameters(), stacked.parameters(), strict=True):
            g.copy_(p.grad)
    return {name: p.detach() for name, p in grads.member(index).named_parameters()}


def _backward(out: torch.Tensor, seed: int = 1) -> None:
    """A backward pass with the same random upstream gradient for every run of one shape."""
    gen = torch.Generator().manual_seed(seed)
    (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()


def _assert_loop_equal(stacked: Stacked, loop: LoopStack) -> None:
    for i, single in enumerate(loop.members):
        expected = dict(single.named_parameters())
        got = _member_grads(stacked, i)
        assert got.keys() == expected.keys()
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name].grad, **TOL, msg=f"member {i}: {name}")


@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_linear_is_n_linears(shared_input):
    torch.manual_seed(0)
    stack = StackedLinear(PARTS, IN, OUT).double()
    loop = unstacked(stack)
    x = torch.randn(B, IN) if shared_input else torch.randn(5, B, IN)
    x = x.double()
    out = stack(x, shared_input=shared_input)
    assert out.shape == (5, B, OUT) and out.is_contiguous()
    torch.testing.assert_close(out, loop(x, shared_input=shared_input), **TOL)
    assert [type(m) for m in loop.members] == [nn.Linear] * 5
    _backward(out)
    _backward(loop(x, shared_input=shared_input))
    _assert_loop_equal(stack, loop)
    assert [k for k, _ in stack.named_parameters()] == [
        "weight.task",
        "weight.shared",
        "bias.task",
        "bias.shared",
    ]


@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_low_rank_linear_is_n_low_rank_sequentials(shared_input):
    torch.manual_seed(0)
    stack = StackedLowRankLinear(PARTS, IN, 2, OUT).double()
    loop = unstacked(stack)
    x = (torch.randn(B, IN) if shared_input else torch.randn(5, B, IN)).double()
    out = stack(x, shared_input=shared_input)
    assert out.shape == (5, B, OUT)
    torch.testing.assert_close(out, loop(x, shared_input=shared_input), **TOL)
    member = loop.members[1]
    assert [type(m) for m in member] == [nn.Linear, nn.Linear] and member[0].bias is None
    assert member[0].weight.shape == (2, IN) and member[1].weight.shape == (OUT, 2)
    _backward(out)
    _backward(loop(x, shared_input=shared_input))
    _assert_loop_equal(stack, loop)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
@pytest.mark.parametrize("shared_input", [True, False])
def test_stacked_mlp_is_n_mlps_with_their_own_norms(norm, shared_input):
    torch.manual_seed(0)
    stack = StackedMLP(PARTS, IN, [8, OUT], activation="gelu", norm=norm).double()
    with torch.no_grad():  # distinct affine parameters per member, so mixing them up would show
        for p in part_parameters(stack, "task") + part_parameters(stack, "shared"):
            p.add_(0.1 * torch.randn_like(p))
    loop = unstacked(stack)
    x = (torch.randn(B, IN) if shared_input else torch.randn(5, B, IN)).double()
    out = stack(x, shared_input=shared_input)  # training mode: BatchNorm uses batch statistics
    loop_out = loop(x, shared_input=shared_input)
    torch.testing.assert_close(out, loop_out, **TOL)
    _backward(out)
    _backward(loop_out)
    _assert_loop_equal(stack, loop)
    if norm == "batch":  # each member's running statistics moved as its own BatchNorm1d's did
        for i, single in enumerate(loop.members):
            bns = [m for m in single.layers if isinstance(m, nn.BatchNorm1d)]
            for bn, stacked_bn in zip(bns, stack.norms, strict=True):
                torch.testing.assert_close(stacked_bn.running_mean[i], bn.running_mean, **TOL)
                torch.testing.assert_close(stacked_bn.running_var[i], bn.running_var, **TOL)
                assert int(stacked_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    stack.eval(), loop.eval()
    torch.testing.assert_close(stack(x, shared_input=shared_input), loop(x, shared_input=shared_input), **TOL)


def test_stacked_mlp_dropout_masks_are_drawn_per_member_and_row():
    stack = StackedMLP(4, IN, [64], dropout=0.5)
    with torch.no_grad():
        for p in stack.parameters():
            p.copy_(p[0].expand_as(p))  # identical members: any difference is dropout's
    out = stack(torch.randn(B, IN), shared_input=True)
    dropped = out == 0
    assert not torch.equal(dropped[0], dropped[1])
    stack.eval()
    kept = stack(torch.randn(B, IN), shared_input=True)
    assert torch.equal(kept[0], kept[1])


def test_stacked_mlp_without_layers_is_the_identity():
    stack = StackedMLP(3, IN, [])
    x = torch.randn(B, IN)
    assert stack.out_features == IN and torch.equal(stack(x, shared_input=True)[2], x)
    assert isinstance(stack.member(0), MLP) and torch.equal(stack.member(0)(x), x)


def test_members_are_drawn_as_the_single_modules_were():
    """Seed for seed, a stack holds the weights of n single modules built one after another, and
    leaves the random stream where they left it."""
    torch.manual_seed(3)
    singles = [MLP(IN, [8, OUT]) for _ in range(N)]
    after_singles = torch.rand(4)
    torch.manual_seed(3)
    stack = StackedMLP(N, IN, [8, OUT])
    assert torch.equal(torch.rand(4), after_singles)
    for i, single in enumerate(singles):
        for (name, a), (_, b) in zip(
            single.state_dict().items(), stack.member(i).state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), (i, name)
    # nn.Linear's ranges: weight and bias within ±1/sqrt(fan_in)
    bound = IN**-0.5
    assert stack.linears[0].weight.abs().max() <= bound and stack.linears[0].bias.abs().max() <= bound


@pytest.mark.parametrize("method, options", CASES, ids=[f"{m}-{sorted(o)}" for m, o in CASES])
def test_every_fi_method_stacked_draws_and_computes_as_its_single_modules(method, options):
    assert STACKED_INTERACTIONS.keys() == INTERACTIONS.keys() == OPTIONS.keys()
    torch.manual_seed(5)
    singles = [build_interaction(method, IN, OUT, **options) for _ in range(5)]
    after_singles = torch.rand(4)
    torch.manual_seed(5)
    stack = build_stacked_interaction(method, PARTS, IN, OUT, **options)
    assert torch.equal(torch.rand(4), after_singles)
    for single, member in zip(singles, stack.members(), strict=True):
        assert type(member) is type(single)
        for (name, a), (_, b) in zip(single.state_dict().items(), member.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    stack.double()
    loop = unstacked(stack)
    inputs = _inputs(method)
    out = stack(*inputs)
    assert out.shape == (5, B, OUT)
    torch.testing.assert_close(out, loop(*inputs), **TOL)
    _backward(out)
    stacked_input_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    _backward(loop(*inputs))
    _assert_loop_equal(stack, loop)
    for ours, theirs in zip(stacked_input_grads, inputs, strict=True):  # x (and the codewords) learn
        torch.testing.assert_close(ours, theirs.grad, **TOL)


def _ple():
    return PLE(
        IN,
        ["a", "b", "c"],
        num_levels=2,
        experts_per_task=[1, 3, 2],
        shared_experts=2,
        expert_hidden=[8, 5],
        tower_hidden=[4],
        norm="layer",
    )


def _cgc():
    return CGC(IN, ["a", "b"], experts_per_task=2, shared_experts=1, expert_hidden=[8], tower_hidden=[4])


def _mmoe():
    return MMoE(IN, ["a", "b"], num_experts=N, expert_hidden=[8, 5], tower_hidden=[4])


def _dtn(selector: str, narrow: bool = False):
    options = {m: {k: v for k, v in OPTIONS[m].items() if k != "cross"} for m in OPTIONS}
    if narrow:  # low-rank GDCN, narrow MaskNet masks
        options["gdcn"]["rank"], options["masknet"]["mask_width"] = 2, 3
    return DTN(
        IN,
        ["a", "b", "c"],
        methods=["gdcn", "masknet", "dcnv2", "mlp", "memonet"],
        module_width=OUT,
        instances_per_method=2,
        method_options=options,
        gate_selector=selector,
        dependencies={"b": "a"},
        tower_hidden=[4],
        cross=SHAPE,
    )


MODELS = {
    "ple": _ple,
    "cgc": _cgc,
    "mmoe": _mmoe,
    "dtn_input": lambda: _dtn("input"),
    "dtn_self": lambda: _dtn("self"),
    "dtn_narrow": lambda: _dtn("input", narrow=True),
}


def _top_stacks(model: nn.Module) -> Dict[str, Stacked]:
    stacks: Dict[str, Stacked] = {}
    for name, module in model.named_modules():
        if isinstance(module, Stacked) and not any(name.startswith(f"{s}.") for s in stacks):
            stacks[name] = module
    return stacks


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_equals_its_loop_of_single_modules(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    loop = unstacked(model)
    stacks = _top_stacks(model)
    assert stacks and all(isinstance(loop.get_submodule(name), LoopStack) for name in stacks)
    x = torch.randn(16, IN, dtype=torch.float64)
    args = (x, torch.randn(16, SHAPE.width, dtype=torch.float64)) if kind.startswith("dtn") else (x,)
    logits, loop_logits = model(*args), loop(*args)
    for t in logits:
        torch.testing.assert_close(logits[t], loop_logits[t], **TOL)
    _backward(torch.stack(list(logits.values())))
    _backward(torch.stack(list(loop_logits.values())))
    for name, stack in stacks.items():
        _assert_loop_equal(stack, loop.get_submodule(name))
    theirs = dict(loop.named_parameters())
    for name, p in model.named_parameters():  # gates and towers: the same modules in both
        if not any(name.startswith(f"{s}.") for s in stacks):
            torch.testing.assert_close(p.grad, theirs[name].grad, **TOL, msg=name)


@pytest.mark.parametrize("kind", ["ple", "dtn_input"])
def test_gradnorm_sees_exactly_the_shared_members(kind):
    """``last_shared_parameters`` are the shared part's own tensors: their gradient norm is the
    norm over the shared members of the loop (PLE's last-level shared experts, DTN's shared group)."""
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    loop = unstacked(model)
    shared = model.last_shared_parameters()
    owned = {id(p) for p in model.parameters()}
    assert shared and all(id(p) in owned for p in shared)
    if kind == "ple":
        experts = loop.levels[-1].experts
        loop_shared = [p for m in experts.members[sum(model.experts_per_task) :] for p in m.parameters()]
    else:
        loop_shared = [
            p
            for s in loop.interactions.values()
            for m in s.members[-model.instances_per_method :]
            for p in m.parameters()
        ]
    assert sum(p.numel() for p in shared) == sum(p.numel() for p in loop_shared)
    x = torch.randn(16, IN, dtype=torch.float64)
    args = (x, torch.randn(16, SHAPE.width, dtype=torch.float64)) if kind.startswith("dtn") else (x,)
    for task in model.task_names:
        ours = _grad_norm(model(*args)[task].pow(2).mean(), shared)
        theirs = _grad_norm(loop(*args)[task].pow(2).mean(), loop_shared)
        torch.testing.assert_close(ours, theirs, **TOL)


def test_documented_state_dict_keys():
    keys = {k: tuple(v.shape) for k, v in _ple().state_dict().items()}
    assert keys["levels.0.experts.linears.0.weight.task"] == (6, 8, IN)  # 1 + 3 + 2 task experts
    assert keys["levels.0.experts.linears.0.weight.shared"] == (2, 8, IN)
    assert keys["levels.1.experts.linears.1.bias.shared"] == (2, 5)
    assert keys["levels.1.experts.norms.1.weight.task"] == (6, 5)
    keys = {k: tuple(v.shape) for k, v in _mmoe().state_dict().items()}
    assert keys["experts.linears.0.weight"] == (N, 8, IN) and keys["experts.linears.1.bias"] == (N, 5)
    keys = {k: tuple(v.shape) for k, v in _dtn("input").state_dict().items()}
    assert keys["interactions.gdcn.cross.0.weight.task"] == (6, IN, IN)  # 3 tasks x 2 instances
    assert keys["interactions.gdcn.cross.0.weight.shared"] == (2, IN, IN)
    assert keys["interactions.memonet.pair_weight.task"] == (6, 3, 8, 4)
    assert keys["interactions.masknet.mask_in.weight.shared"] == (4, IN, IN)  # 2 instances x 2 blocks
    low_rank = build_stacked_interaction("gdcn", PARTS, IN, OUT, rank=2)
    keys = {k: tuple(v.shape) for k, v in low_rank.state_dict().items()}
    assert keys["cross.0.down.weight.task"] == (3, 2, IN) and keys["cross.0.up.bias.shared"] == (2, IN)
    assert keys["gates.1.up.weight.task"] == (3, IN, 2) and "gates.1.up.bias.task" not in keys


class _Scripted(nn.Module):
    def __init__(self, network: nn.Module, reads_cross: bool) -> None:
        super().__init__()
        self.network = network
        self.reads_cross = reads_cross

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.reads_cross:
            return self.network(x, cross)
        return self.network(x)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fx_traced_and_scripted_as_export_does(kind):
    """trainer.export traces the network with torchrec.fx and compiles it with TorchScript."""
    from torchrec.fx import symbolic_trace

    torch.manual_seed(0)
    model = _Scripted(MODELS[kind]().eval(), kind.startswith("dtn"))
    scripted = torch.jit.script(symbolic_trace(model))
    x, cross = torch.randn(4, IN), torch.randn(4, SHAPE.width)
    expected, got = model(x, cross), scripted(x, cross)
    for t in expected:
        torch.testing.assert_close(got[t], expected[t])


def test_parts_must_have_members():
    assert count_members(PARTS) == 5 and count_members(4) == 4
    with pytest.raises(ValueError, match="at least one member"):
        StackedLinear({"task": 2, "shared": 0}, IN, OUT)
    with pytest.raises(ValueError, match="at least one member"):
        StackedMLP(0, IN, [4])
