"""DTN: feature-interaction modules, gating networks, TSN dependencies, config and builder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from config_utils import write_config
from towerrec.modules.builders import build_network
from towerrec.modules.config import DTNConfig
from towerrec.modules.dtn import DTN, GatingNetwork, dependency_order
from towerrec.modules.interaction import (
    GDCN,
    INTERACTIONS,
    CrossShape,
    DCNv2,
    MaskBlock,
    MaskNet,
    build_interaction,
)
from towerrec.modules.stacked import part_parameters
from towerrec.trainer.config import ConfigError, load_config

TASKS = ["click", "conversion", "like"]
IN, D = 6, 5


def _dtn(tasks=TASKS, **kw):
    torch.manual_seed(0)
    options = {
        "masknet": {"num_blocks": 2, "block_width": 3, "hidden": [4]},
        "mlp": {"hidden": [4]},
    }
    args = {"methods": ["gdcn", "masknet"], "module_width": D, "tower_hidden": [4], "method_options": options}
    return DTN(IN, tasks, **{**args, **kw})


def test_low_rank_gdcn_layer_matches_hand_computation():
    """With ``rank``, ``W = V U^T`` and the gate ``U_g = V_g U_g'^T``: thin factors, the same layer."""
    torch.manual_seed(0)
    gdcn = GDCN(3, 2, num_layers=1, rank=1)
    cross, gate = gdcn.cross[0], gdcn.gates[0]
    assert [tuple(m.weight.shape) for m in (*cross, *gate)] == [(1, 3), (3, 1), (1, 3), (3, 1)]
    assert cross[0].bias is None and gate[0].bias is None and gate[1].bias is None
    w = cross[1].weight @ cross[0].weight  # rank-1 [3, 3]
    u = gate[1].weight @ gate[0].weight
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    c1 = x * (x @ w.T + cross[1].bias) * torch.sigmoid(x @ u.T) + x
    torch.testing.assert_close(gdcn(x), gdcn.out(c1))
    assert torch.linalg.matrix_rank(w) == 1
    with pytest.raises(ValueError, match="rank must be >= 1 or None"):
        GDCN(3, 2, rank=0)


def test_masknet_mask_width_narrows_the_mask_hidden_layer():
    net = MaskNet(6, 4, num_blocks=2, block_width=3, hidden=[5], mask_width=2)
    for block in net.blocks:
        assert block.mask[0].weight.shape == (2, 6) and block.mask[2].weight.shape == (6, 2)
    assert net(torch.randn(3, 6)).shape == (3, 4)
    assert MaskNet(6, 4).blocks[0].mask[0].weight.shape == (6, 6)  # default: x's width


def test_gdcn_one_layer_matches_hand_computation():
    torch.manual_seed(0)
    gdcn = GDCN(3, 2, num_layers=1)
    w = torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.5, 0.5, 0.5]])
    b = torch.tensor([0.1, 0.2, -0.3])
    u = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 0.0]])
    with torch.no_grad():
        gdcn.cross[0].weight.copy_(w)
        gdcn.cross[0].bias.copy_(b)
        gdcn.gates[0].weight.copy_(u)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    c1 = x * (x @ w.T + b) * torch.sigmoid(x @ u.T) + x
    torch.testing.assert_close(gdcn(x), gdcn.out(c1))
    assert gdcn.gates[0].bias is None and gdcn(x).shape == (2, 2)
    # one entry by hand: x_0 * (W_0 . x + b_0) * sigmoid(U_0 . x) + x_0 = 1 * (1 - 2 + 0.1) * sigmoid(2) + 1
    assert c1[0, 0].item() == pytest.approx(-0.9 / (1 + math.exp(-2.0)) + 1)


def test_dcnv2_is_the_full_rank_cross_formula():
    """TorchRec's CrossNet computes our DCN-v2: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``."""
    torch.manual_seed(0)
    dcn = DCNv2(3, 2, num_layers=2)
    w = [torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 0.0], [0.5, 0.5, 0.5]]), torch.eye(3) * 0.5]
    b = [torch.tensor([0.1, 0.2, -0.3]), torch.tensor([0.0, 1.0, 0.0])]
    with torch.no_grad():
        for layer in range(2):
            dcn.cross.kernels[layer].copy_(w[layer])
            dcn.cross.bias[layer].copy_(b[layer].unsqueeze(1))
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    c1 = x * (x @ w[0].T + b[0]) + x
    c2 = x * (c1 @ w[1].T + b[1]) + c1
    torch.testing.assert_close(dcn(x), c2 @ dcn.out.weight.T + dcn.out.bias)
    # one entry by hand: 1 * (1 - 2 + 0.1) + 1
    assert c1[0, 0].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        DCNv2(3, 2, num_layers=0)


def test_masknet_block_is_the_instance_guided_mask_formula():
    """``h = ReLU(LayerNorm(W3 (x * (W2 ReLU(W1 x + c1) + c2))))``, written out with the weights."""
    torch.manual_seed(0)
    block = MaskBlock(3, block_width=2)
    w1 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, -1.0]])
    w2, c1, c2 = torch.eye(3) * 2.0, torch.tensor([0.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    w3 = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]])
    with torch.no_grad():
        block.mask[0].weight.copy_(w1)
        block.mask[0].bias.copy_(c1)
        block.mask[2].weight.copy_(w2)
        block.mask[2].bias.copy_(c2)
        block.hidden.weight.copy_(w3)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    mask = torch.relu(x @ w1.T + c1) @ w2.T + c2
    # the mask has the width of x; by hand for row 0: relu([1, 1, 4.5]) * 2 + [1, 0, 0]
    torch.testing.assert_close(mask[0], torch.tensor([3.0, 2.0, 9.0]))
    z = (x * mask) @ w3.T  # row 0: [3, 4, -9] @ w3.T = [-5.5, -1]
    torch.testing.assert_close(z[0], torch.tensor([-5.5, -1.0]))
    normed = (z - z.mean(1, keepdim=True)) / torch.sqrt(z.var(1, unbiased=False, keepdim=True) + 1e-5)
    expected = torch.relu(normed)  # LayerNorm's own scale 1 and shift 0 at initialisation
    torch.testing.assert_close(block(x), expected)
    assert block.hidden.bias is None  # LayerNorm carries the bias
    net = MaskNet(3, 7, num_blocks=3, block_width=4, hidden=[8, 8])
    assert net.mlp.in_features == 12 and net(x).shape == (2, 7)  # 3 blocks of width 4, concatenated
    assert isinstance(MaskNet(6, 8, block_width=4, hidden=[8]).out, torch.nn.Identity)  # already width d


@pytest.mark.parametrize("name", sorted(set(INTERACTIONS) - {"memonet"}))
def test_every_interaction_maps_to_width_d(name):
    assert build_interaction(name, 6, D)(torch.randn(3, 6)).shape == (3, D)
    with pytest.raises(ValueError, match="unknown interaction method 'fm'; known: \\['dcnv2', 'gdcn'"):
        build_interaction("fm", 6, D)


def test_codebook_projects_each_pair_then_mixes_with_x():
    torch.manual_seed(0)
    shape = CrossShape(num_pairs=3, num_hashes=2, dim=4)
    module = build_interaction("memonet", IN, D, cross=shape)
    x, cross = torch.randn(5, IN), torch.randn(5, shape.width)
    by_pair = cross.view(5, 3, 8)  # pair-major, hash-minor: [codeword h0 | codeword h1] per pair
    pairs = [by_pair[:, p] @ module.pair_weight[p] + module.pair_bias[p] for p in range(3)]
    torch.testing.assert_close(module(x, cross), module.out(torch.cat([x] + pairs, dim=-1)))
    assert module.out.in_features == IN + 3 * 4 and module(x, cross).shape == (5, D)
    with pytest.raises(ValueError, match="memonet needs the cross codebook: set data.cross"):
        build_interaction("memonet", IN, D)


def test_memonet_modules_read_the_codebook_in_every_group():
    shape = CrossShape(num_pairs=1, num_hashes=2, dim=3)
    dtn = _dtn(methods=["gdcn", "memonet"], cross=shape)
    x, cross = torch.randn(4, IN), torch.randn(4, shape.width)
    logits, trace = dtn.forward_with_gates(x, cross)
    for t in TASKS:
        assert [type(dtn.fi_module(t, m)).__name__ for m in dtn.methods] == ["GDCN", "HashedCrossCodebook"]
        torch.testing.assert_close(trace.groups[t][1], dtn.fi_module(t, "memonet")(x, cross))
    changed = dtn(x, cross + 1.0)  # the codebook vectors reach every task's logit
    assert all(not torch.allclose(changed[t], logits[t]) for t in TASKS)
    with pytest.raises(ValueError, match="needs the cross codebook vectors"):
        dtn(x)
    cross.requires_grad_(True)  # the codebook rows learn through every memonet module
    sum(v.sum() for v in dtn(x, cross).values()).backward()
    assert cross.grad is not None and cross.grad.abs().sum() > 0
    assert all(p.grad is not None for name, p in dtn.named_parameters() if "pair_" in name)


def _same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_self_and_pool_see_the_right_groups():
    dtn = _dtn(instances_per_method=2)
    x = torch.randn(4, IN)
    logits, trace = dtn.forward_with_gates(x)
    per_group = 4  # 2 methods x 2 instances
    assert all(len(trace.groups[t]) == per_group for t in TASKS) and len(trace.shared) == per_group
    modules = [(m, i) for m in ("gdcn", "masknet") for i in (0, 1)]
    for t in TASKS:
        # each group's outputs are its own modules' (the single FI classes with its weights)
        for out, (m, i) in zip(trace.groups[t], modules, strict=True):
            torch.testing.assert_close(out, dtn.fi_module(t, m, i)(x))
        _same(trace.self_inputs[t], trace.groups[t])
        expected = [o for other in TASKS if other != t for o in trace.groups[other]] + trace.shared
        assert len(trace.pool_inputs[t]) == 3 * per_group
        _same(trace.pool_inputs[t], expected)  # no TSN: unscaled, k's own group absent
        assert dtn.self_sources[t] == [f"{t}/{m}.{i}" for m, i in modules]
        assert not any(s.startswith(f"{t}/") for s in dtn.pool_sources[t])
        assert trace.self_weights[t].shape == (4, per_group) and trace.pool_weights[t].shape == (4, 12)
    for out, (m, i) in zip(trace.shared, modules, strict=True):
        torch.testing.assert_close(out, dtn.fi_module(None, m, i)(x))
    # no parameter is shared between groups: changing one group's gdcn.1 changes that output only
    member = TASKS.index("like") * 2 + 1
    with torch.no_grad():
        for p in part_parameters(dtn.interactions["gdcn"], "task"):
            p[member].add_(1.0)
    _, after = dtn.forward_with_gates(x)
    changed = [
        (g, k)
        for g, (old, new) in enumerate(
            zip([*trace.groups.values(), trace.shared], [*after.groups.values(), after.shared], strict=True)
        )
        for k in range(per_group)
        if not torch.equal(old[k], new[k])
    ]
    assert changed == [(TASKS.index("like"), 1)]


def test_tsn_scales_the_parent_group_by_its_probability():
    dtn = _dtn(dependencies={"conversion": "click"})
    assert dtn.order == ["click", "conversion", "like"]
    logits, trace = dtn.forward_with_gates(torch.randn(4, IN))
    prob = torch.sigmoid(logits["click"]).unsqueeze(-1)
    pool = trace.pool_inputs["conversion"]
    n = len(trace.groups["click"])
    for scaled, raw in zip(pool[:n], trace.groups["click"], strict=True):
        torch.testing.assert_close(scaled, raw * prob)
        assert not torch.allclose(scaled, raw)
    _same(pool[n : 2 * n], trace.groups["like"])  # not a parent: unscaled
    # the parent's own pool and other tasks are unscaled
    _same(trace.pool_inputs["like"][:n], trace.groups["click"])


@pytest.mark.parametrize("detach", [True, False])
def test_tsn_detach_controls_gradient_into_the_parent_tower(detach):
    dtn = _dtn(["click", "conversion"], dependencies={"conversion": "click"}, tsn_detach=detach)
    dtn(torch.randn(8, IN))["conversion"].sum().backward()
    grads = [p.grad for p in dtn.towers["click"].parameters()]
    if detach:
        assert all(g is None for g in grads)
    else:
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in dtn.towers["conversion"].parameters())


def test_dependency_order_and_errors():
    assert dependency_order(["c", "b", "a"], {"c": "b", "b": "a"}) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cycle a -> b -> a"):
        _dtn(["a", "b"], dependencies={"a": "b", "b": "a"})
    with pytest.raises(ValueError, match="cycle a -> a"):
        _dtn(["a", "b"], dependencies={"a": "a"})
    with pytest.raises(ValueError, match="parent 'view' of 'conversion' is not a task; tasks: \\['click'"):
        _dtn(["click", "conversion"], dependencies={"conversion": "view"})
    with pytest.raises(ValueError, match="task 'buy' of 'buy' is not a task"):
        build_network(DTNConfig(type="dtn", dependencies={"buy": "click"}), IN, ["click", "conversion"])


@pytest.mark.parametrize("combine, width", [("concat", 2 * D), ("sum", D)])
def test_combine_sets_the_tower_width(combine, width):
    dtn = _dtn(combine=combine)
    seen = {}
    for t in TASKS:
        dtn.towers[t].register_forward_hook(lambda m, a, o, t=t: seen.__setitem__(t, a[0]))
    _, trace = dtn.forward_with_gates(torch.randn(3, IN))
    assert all(dtn.towers[t].mlp.in_features == width and seen[t].shape == (3, width) for t in TASKS)


@pytest.mark.parametrize("selector", ["input", "self"])
def test_gate_selectors(selector):
    dtn = _dtn(gate_selector=selector)
    gate = dtn.self_gates["click"]
    assert (gate.gate is not None) == (selector == "input") and (gate.score is not None) == (
        selector == "self"
    )
    _, trace = dtn.forward_with_gates(torch.randn(7, IN))
    for w in [*trace.self_weights.values(), *trace.pool_weights.values()]:
        torch.testing.assert_close(w.sum(1), torch.ones(7))
    # self selector: softmax over ReLU(Linear(candidate)) with one scorer per GN
    gn = GatingNetwork(IN, 3, D, selector="self")
    cands = [torch.randn(7, D) for _ in range(3)]
    mixed, w = gn(torch.randn(7, IN), cands)
    scores = torch.stack([torch.relu(gn.score(c)).squeeze(-1) for c in cands], 1)
    torch.testing.assert_close(w, torch.softmax(scores, 1))
    torch.testing.assert_close(mixed, sum(w[:, i : i + 1] * c for i, c in enumerate(cands)))


@pytest.mark.parametrize("selector", ["input", "self"])
@pytest.mark.parametrize("methods", [["gdcn", "masknet"], ["dcnv2", "mlp"]])
def test_gradients_reach_every_parameter(selector, methods):
    dtn = _dtn(gate_selector=selector, methods=methods, dependencies={"conversion": "click"})
    sum(v.sum() for v in dtn(torch.randn(32, IN)).values()).backward()
    for name, p in dtn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fx_traceable():
    dtn = _dtn(dependencies={"conversion": "click"}, gate_selector="self").eval()
    x = torch.randn(3, IN)
    traced = torch.fx.symbolic_trace(dtn)
    for t in TASKS:
        torch.testing.assert_close(traced(x)[t], dtn(x)[t])


MODEL = {
    "type": "dtn",
    "methods": ["gdcn", "masknet", "dcnv2"],
    "module_width": 8,
    "masknet_block_width": 4,
    "masknet_hidden": [8],
    "gate_selector": "self",
    "dependencies": {"conversion": "click"},
    "combine": "sum",
    "tower_hidden": [4],
}


def test_config_parses_and_builds(tmp_path: Path):
    config = load_config(write_config(tmp_path, MODEL))
    assert config.model.model_dump(include=set(MODEL)) == MODEL
    net = build_network(config.model, in_features=10, task_names=["click", "conversion"])
    assert isinstance(net, DTN) and net.dependencies == {"conversion": "click"} and net.combine == "sum"
    assert [type(net.fi_module(None, m)).__name__ for m in net.methods] == ["GDCN", "MaskNet", "DCNv2"]
    assert [type(s).__name__ for s in net.interactions.values()] == [
        "StackedGDCN",
        "StackedMaskNet",
        "StackedDCNv2",
    ]
    assert net.towers["click"].mlp.in_features == 8
    narrow = load_config(write_config(tmp_path, {**MODEL, "gdcn_rank": 3, "masknet_mask_width": 2}))
    narrow_net = build_network(narrow.model, in_features=10, task_names=["click", "conversion"])
    assert narrow_net.fi_module("click", "gdcn").cross[0][0].weight.shape == (3, 10)
    assert narrow_net.fi_module("click", "masknet").blocks[0].mask[0].weight.shape == (2, 10)
    out = net(torch.randn(2, 10))
    assert set(out) == {"click", "conversion"} and out["click"].shape == (2,)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"methods": ["gdcn", "fm"]},
            "model.dtn.methods.1: Input should be 'gdcn', 'masknet', 'memonet', 'dcnv2' or 'mlp'",
        ),
        ({"methods": ["gdcn", "memonet"]}, "model.methods: memonet needs data.cross"),
        (
            {"dependencies": {"click": "conversion", "conversion": "click"}},
            "cycle click -> conversion -> click",
        ),
        ({"dependencies": {"click": "click"}}, "cycle click -> click"),
        ({"dependencies": {"conversion": "view"}}, "unknown task 'view'; tasks: \\['click', 'conversion'\\]"),
        ({"methods": ["gdcn", "gdcn"]}, "repeats a method"),
        ({"gate_selector": "x"}, "model.dtn.gate_selector"),
    ],
)
def test_config_errors(tmp_path: Path, change: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, {**MODEL, **change}))


CROSS_DATA = {
    "tables": [
        {"name": "user", "num_embeddings": 100, "embedding_dim": 8},
        {"name": "codebook", "num_embeddings": 1000, "embedding_dim": 4},
    ],
    "sparse_features": [
        {"name": "user_id", "table": "user"},
        {"name": "city", "table": "user"},
        {"name": "history", "table": "user", "multi_hot": True},
    ],
    "cross": {"table": "codebook", "fields": ["user_id", "city"]},
}


def test_cross_codebook_config_builds_codebook_table_and_shape(tmp_path: Path):
    from towerrec.trainer.model import build_train_module, cross_shape, embedding_bag_configs

    config = load_config(write_config(tmp_path, {**MODEL, "methods": ["gdcn", "memonet"]}, CROSS_DATA))
    assert config.data.cross.feature_names == ["user_id_x_city_h0", "user_id_x_city_h1"]
    tables = {t.name: t.feature_names for t in embedding_bag_configs(config.data)}
    assert tables["codebook"] == ["user_id_x_city_h0", "user_id_x_city_h1"]
    assert cross_shape(config.data) == CrossShape(num_pairs=1, num_hashes=2, dim=4)
    model = build_train_module(config, torch.device("meta")).model
    # x holds the three field embeddings and the dense feature; the codewords stay out of it
    assert model.in_features == 3 * 8 + 1 and model.cross_order == ["user_id_x_city_h0", "user_id_x_city_h1"]


@pytest.mark.parametrize(
    "model_change, cross_change, message",
    [
        ({}, {"fields": ["user_id", "history"]}, "data.cross.fields\\[1\\]: 'history' is multi-hot"),
        ({}, {"fields": ["user_id", "age"]}, "data.cross.fields\\[1\\]: 'age' is not a sparse feature"),
        ({}, {"fields": ["user_id"]}, "data.cross.fields"),
        ({}, {"table": "items"}, "data.cross.table: unknown table 'items'"),
        ({}, {"table": "user"}, "'user' is the cross codebook; sparse features .* must use another table"),
        ({"methods": ["gdcn"]}, {}, "data.cross: .* model.type is 'dtn' without memonet"),
        ({"type": "mmoe"}, {}, "data.cross: .* read only by model.type dtn .* model.type is 'mmoe'"),
    ],
)
def test_cross_config_errors(tmp_path: Path, model_change: dict, cross_change: dict, message: str):
    model = {**MODEL, "methods": ["gdcn", "memonet"], **model_change}
    if model["type"] != "dtn":
        model = {"type": model["type"]}
    data = {**CROSS_DATA, "cross": {**CROSS_DATA["cross"], **cross_change}}
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, model, data))
