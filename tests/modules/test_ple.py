"""PLE / CGC structure, against the traps docs/MODELS.md lists."""

import types

import pytest
import torch
from towerrec.modules.builders import build_network
from towerrec.modules.config import PLEConfig
from towerrec.modules.ple import CGC, PLE
from towerrec.modules.stacked import part_parameters

TASKS = ["a", "b", "c"]
COUNTS = [1, 3, 2]  # differs from the task count on purpose
M_S = 2


def _ple(num_levels=2, **kw):
    torch.manual_seed(0)
    kw = {"experts_per_task": COUNTS, "shared_experts": M_S, "expert_hidden": [6], "tower_hidden": [4], **kw}
    return PLE(5, TASKS, num_levels=num_levels, **kw)


def test_candidate_counts_per_gate():
    ple = _ple(num_levels=2)
    for level in ple.levels:
        assert level.experts_per_task == COUNTS and level.num_shared_experts == M_S
        assert level.experts.num_members == sum(COUNTS) + M_S
        assert [p.shape[0] for p in part_parameters(level.experts, "task")] == [sum(COUNTS)] * 2
        assert [p.shape[0] for p in part_parameters(level.experts, "shared")] == [M_S] * 2
        assert [g.num_candidates for g in level.task_gates] == [m + M_S for m in COUNTS]
    assert ple.levels[0].shared_gate.num_candidates == sum(COUNTS) + M_S
    assert ple.levels[1].shared_gate is None  # nothing reads g_s after the last level


def test_shapes_and_gate_weights_with_uneven_experts():
    ple = _ple(num_levels=2)
    x = torch.randn(7, 5)
    logits, gates = ple.forward_with_gates(x)
    assert list(logits) == TASKS and all(v.shape == (7,) for v in logits.values())
    assert len(gates) == 2
    for level in gates:
        for t, m in zip(TASKS, COUNTS, strict=True):
            w = level.task[t]
            assert w.shape == (7, m + M_S)
            torch.testing.assert_close(w.sum(1), torch.ones(7))
            assert (w < 1).all()
    assert gates[0].shared.shape == (7, sum(COUNTS) + M_S) and gates[1].shared is None
    torch.testing.assert_close(ple(x), logits)


def test_gradients_reach_every_expert_and_gate():
    ple = _ple(num_levels=2)
    sum(v.sum() for v in ple(torch.randn(16, 5)).values()).backward()
    for name, p in ple.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _record_gate_inputs(level):
    """Capture (selector, candidates) of every gate and the output of every expert, the latter
    computed by the expert's own MLP (``level.expert``) from the input the stacked experts read."""
    seen = {"gate_in": {}, "expert_out": {}}
    for k, gate in enumerate(level.task_gates):
        gate.register_forward_hook(lambda m, a, o, k=k: seen["gate_in"].__setitem__(k, a))
    if level.shared_gate is not None:
        level.shared_gate.register_forward_hook(lambda m, a, o: seen["gate_in"].__setitem__("s", a))

    def experts_hook(module, args, kwargs, out):
        inputs = args[0]
        branches = [(k, i) for k, m in enumerate(COUNTS) for i in range(m)] + [("s", i) for i in range(M_S)]
        for e, (k, i) in enumerate(branches):
            x = inputs if kwargs.get("shared_input") else inputs[e]
            single = level.expert(None if k == "s" else k, i)(x)
            torch.testing.assert_close(out[e], single)  # the stacked expert e is that MLP
            seen["expert_out"][(k, i)] = out[e]

    level.experts.register_forward_hook(experts_hook, with_kwargs=True)
    return seen


def _same(candidates, expected):
    assert candidates.shape[0] == len(expected)
    for c, e in zip(candidates, expected, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_task_gate_candidates_are_own_plus_shared_experts():
    ple = _ple(num_levels=1)
    seen = _record_gate_inputs(ple.levels[0])
    ple(torch.randn(3, 5))
    shared = [seen["expert_out"][("s", i)] for i in range(M_S)]
    for k, m in enumerate(COUNTS):
        _, cands = seen["gate_in"][k]
        _same(cands, [seen["expert_out"][(k, i)] for i in range(m)] + shared)


def test_shared_gate_candidates_are_all_experts():
    ple = _ple(num_levels=2)
    seen = _record_gate_inputs(ple.levels[0])
    ple(torch.randn(3, 5))
    _, cands = seen["gate_in"]["s"]
    every = [seen["expert_out"][(k, i)] for k, m in enumerate(COUNTS) for i in range(m)]
    _same(cands, every + [seen["expert_out"][("s", i)] for i in range(M_S)])


def _perturb_task_experts(level, task):
    start = level.starts[task]
    with torch.no_grad():
        for p in part_parameters(level.experts, "task"):
            rows = p[start : start + level.experts_per_task[task]]
            rows.add_(torch.randn_like(rows))


def test_cgc_task_gate_ignores_other_tasks_experts():
    cgc = CGC(5, TASKS, experts_per_task=COUNTS, shared_experts=M_S, expert_hidden=[6], tower_hidden=[4])
    x = torch.randn(4, 5)
    before = cgc(x)
    _perturb_task_experts(cgc.levels[0], task=1)
    after = cgc(x)
    torch.testing.assert_close(after["a"], before["a"])
    torch.testing.assert_close(after["c"], before["c"])
    assert not torch.allclose(after["b"], before["b"])


def test_ple_last_level_task_experts_are_private():
    ple = _ple(num_levels=2)
    x = torch.randn(4, 5)
    before = ple(x)
    _perturb_task_experts(ple.levels[1], task=1)
    after = ple(x)
    torch.testing.assert_close(after["a"], before["a"])
    assert not torch.allclose(after["b"], before["b"])
    # On level 1 they legitimately reach task a through the shared gate.
    _perturb_task_experts(ple.levels[0], task=1)
    assert not torch.allclose(ple(x)["a"], before["a"])


def test_level_inputs_follow_the_previous_level():
    ple = _ple(num_levels=3)
    ins, outs = {}, {}

    def watch(module, key, record_out=False):
        def hook(m, args, out):  # returns None: must not replace the module's output
            ins[key] = args[0]
            if record_out:
                outs[key] = out[0]  # gates return (mixture, weights)

        module.register_forward_hook(hook)

    for j, level in enumerate(ple.levels):
        for k, gate in enumerate(level.task_gates):
            watch(gate, (j, k), record_out=True)
        if level.shared_gate is not None:
            watch(level.shared_gate, (j, "s"), record_out=True)
        watch(level.experts, (j, "e"))
    for t in TASKS:
        watch(ple.towers[t], t)
    x = torch.randn(4, 5)
    ple(x)
    for k in range(len(TASKS)):  # level 1: every branch reads x
        assert ins[(0, k)] is x
    assert ins[(0, "s")] is x and ins[(0, "e")] is x  # one input for all experts
    for j in (1, 2):  # level j > 1: task k reads g_k, shared reads g_s of level j - 1
        experts_in = ins[(j, "e")]  # [n, B, in]: expert e's own input
        for k in range(len(TASKS)):
            assert ins[(j, k)] is outs[(j - 1, k)]
            start = ple.levels[j].starts[k]
            _same(experts_in[start : start + COUNTS[k]], [outs[(j - 1, k)]] * COUNTS[k])
        _same(experts_in[sum(COUNTS) :], [outs[(j - 1, "s")]] * M_S)
    assert ins[(1, "s")] is outs[(0, "s")]
    for k, t in enumerate(TASKS):  # tower k reads g_k of the last level
        assert ins[t] is outs[(2, k)]


def test_cgc_is_one_level_without_shared_gate():
    cgc = CGC(5, ["a", "b"], experts_per_task=2)
    assert len(cgc.levels) == 1 and cgc.levels[0].shared_gate is None
    with pytest.raises(ValueError):
        CGC(5, ["a", "b"], num_levels=2)


def test_invalid_configs():
    with pytest.raises(ValueError):
        PLE(5, TASKS, experts_per_task=[1, 2])
    with pytest.raises(ValueError):
        PLE(5, ["a", "a"])
    with pytest.raises(ValueError):
        PLE(5, TASKS, num_levels=0)


def test_fx_traceable():
    ple = _ple(num_levels=2).eval()
    x = torch.randn(3, 5)
    traced = torch.fx.symbolic_trace(ple)
    for t in TASKS:
        torch.testing.assert_close(traced(x)[t], ple(x)[t])


def test_build_network_from_config():
    config = PLEConfig(type="ple", num_levels=1, experts_per_task=[2, 1], expert_hidden=[8], tower_hidden=[4])
    net = build_network(config, in_features=10, task_names=["a", "b"])
    assert isinstance(net, PLE) and len(net.levels) == 1 and net.experts_per_task == [2, 1]
    assert net(torch.randn(2, 10))["b"].shape == (2,)
    with pytest.raises(ValueError, match="unknown model.type"):
        build_network(types.SimpleNamespace(type="nope"), 10, ["a"])
