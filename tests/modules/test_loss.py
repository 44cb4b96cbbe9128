"""MultiTaskLoss: sample spaces, pos_weight, padding rows, empty spaces, epoch decay, and the
learned weightings (uncertainty, GradNorm) checked by hand and by the direction they move."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from towerrec.modules.loss import MultiTaskLoss, TaskLossSpec

B = 8


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {t: torch.randn(B, generator=g, requires_grad=True) for t in ("click", "cvr")}
    labels = {
        "click": torch.tensor([1, 0, 1, 0, 1, 1, 0, 0.0]),
        "cvr": torch.tensor([1, 1, 0, 0, 1, 0, 1, 0.0]),
    }
    return logits, labels, torch.ones(B)


def _bce(logit, label, **kw):
    return F.binary_cross_entropy_with_logits(logit, label, **kw)


def test_plain_mean_bce_and_detached_task_losses():
    logits, labels, w = _batch()
    loss = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", weight=0.5)])
    total, per_task = loss(logits, labels, w)
    click, cvr = _bce(logits["click"], labels["click"]), _bce(logits["cvr"], labels["cvr"])
    torch.testing.assert_close(per_task["click"], click.detach())
    torch.testing.assert_close(total, click + 0.5 * cvr)
    assert not per_task["cvr"].requires_grad and total.requires_grad


def test_sample_space_masks_loss_and_gradient():
    loss_fn = MultiTaskLoss([TaskLossSpec("click", weight=0.0), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    total, per_task = loss_fn(logits, labels, w)
    inside = labels["click"] == 1
    torch.testing.assert_close(per_task["cvr"], _bce(logits["cvr"][inside], labels["cvr"][inside]).detach())
    total.backward()
    assert (logits["cvr"].grad[~inside] == 0).all() and (logits["cvr"].grad[inside] != 0).all()

    # Changing anything outside the space changes neither loss nor gradient.
    logits2, labels2, _ = _batch()
    with torch.no_grad():
        logits2["cvr"][~inside] += 10.0
    labels2["cvr"][~inside] = 1 - labels2["cvr"][~inside]
    total2, _ = loss_fn(logits2, labels2, w)
    total2.backward()
    torch.testing.assert_close(total2, total)
    torch.testing.assert_close(logits2["cvr"].grad, logits["cvr"].grad)

    ew = loss_fn.example_weights(labels, w)
    torch.testing.assert_close(ew["cvr"], inside.float())
    torch.testing.assert_close(ew["click"], w)


def test_pos_weight():
    logits, labels, w = _batch()
    _, plain = MultiTaskLoss([TaskLossSpec("click")])(logits, labels, w)
    _, weighted = MultiTaskLoss([TaskLossSpec("click", pos_weight=3.0)])(logits, labels, w)
    expected = _bce(logits["click"], labels["click"], pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(weighted["click"], expected.detach())
    assert weighted["click"] > plain["click"]


def test_padding_rows_are_ignored():
    loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    total, _ = loss_fn(logits, labels, w)
    pad = 3  # garbage rows that look like clicked positives, but with row weight 0
    padded_logits = {t: torch.cat([v, torch.full((pad,), 5.0)]) for t, v in logits.items()}
    padded_labels = {t: torch.cat([v, torch.ones(pad)]) for t, v in labels.items()}
    padded_total, _ = loss_fn(padded_logits, padded_labels, torch.cat([w, torch.zeros(pad)]))
    torch.testing.assert_close(padded_total, total)


def test_empty_sample_space_is_zero_not_nan():
    loss_fn = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr", sample_space="click")])
    logits, labels, w = _batch()
    labels["click"] = torch.zeros(B, dtype=torch.long)  # integer labels are accepted too
    total, per_task = loss_fn(logits, labels, w)
    assert per_task["cvr"].item() == 0.0 and torch.isfinite(total)
    total.backward()
    assert (logits["cvr"].grad == 0).all() and torch.isfinite(logits["click"].grad).all()
    # All rows padding: still 0 and a working graph.
    total, _ = loss_fn(logits, labels, torch.zeros(B))
    assert total.item() == 0.0 and total.requires_grad


def test_epoch_decay_of_task_weights():
    loss_fn = MultiTaskLoss([TaskLossSpec("click", weight=2.0, weight_decay=0.5), TaskLossSpec("cvr")])
    logits, labels, w = _batch()
    _, per_task = loss_fn(logits, labels, w)
    for epoch, omega in [(0, 2.0), (1, 1.0), (2, 0.5)]:
        loss_fn.set_epoch(epoch)
        total, _ = loss_fn(logits, labels, w)
        assert loss_fn.task_weights() == {"click": omega, "cvr": 1.0}
        torch.testing.assert_close(total.detach(), omega * per_task["click"] + per_task["cvr"])


def test_invalid_specs():
    with pytest.raises(ValueError):
        MultiTaskLoss([TaskLossSpec("cvr", sample_space="click")])
    with pytest.raises(ValueError):
        MultiTaskLoss([TaskLossSpec("a"), TaskLossSpec("a")])


def test_fixed_ignores_shared_and_has_no_parameters():
    loss_fn = MultiTaskLoss([TaskLossSpec("click", weight=2.0), TaskLossSpec("cvr")])
    logits, labels, w = _batch()
    total, per_task = loss_fn(logits, labels, w, shared=[torch.ones(2, requires_grad=True)])
    assert list(loss_fn.parameters()) == [] and list(loss_fn.state_dict()) == []
    torch.testing.assert_close(total, 2.0 * per_task["click"] + per_task["cvr"], rtol=0, atol=0)


def test_learned_weightings_refuse_fixed_weights_and_unknown_names():
    with pytest.raises(ValueError, match="fixed weighting only"):
        MultiTaskLoss([TaskLossSpec("a", weight=0.5)], weighting="uncertainty")
    with pytest.raises(ValueError, match="fixed weighting only"):
        MultiTaskLoss([TaskLossSpec("a", weight_decay=0.9)], weighting="gradnorm")
    with pytest.raises(ValueError, match="unknown weighting"):
        MultiTaskLoss([TaskLossSpec("a")], weighting="dwa")
    with pytest.raises(ValueError, match="shared parameters"):
        gradnorm = MultiTaskLoss([TaskLossSpec("click"), TaskLossSpec("cvr")], weighting="gradnorm")
        gradnorm(*_batch())


# ---- learned task weights on a tiny shared-bottom model ----------------------------------------


class _Tiny(nn.Module):
    """A shared layer (GradNorm's W) and one linear head per task."""

    def __init__(self, tasks=("clean", "noisy")):
        super().__init__()
        self.shared = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 1) for t in tasks})

    def forward(self, x):
        h = torch.relu(self.shared(x))
        return {t: head(h).squeeze(-1) for t, head in self.heads.items()}


def _tiny_problem(n=512):
    """``clean`` is a function of x (its loss falls fast, towards 0); ``noisy`` is a fair coin
    (irreducible: its loss stays near ln 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    labels = {"clean": (x[:, 0] + x[:, 1] > 0).float(), "noisy": (torch.rand(n, generator=g) < 0.5).float()}
    return x, labels, torch.ones(n)


def _train(weighting, steps=200):
    torch.manual_seed(0)
    net = _Tiny()
    loss_fn = MultiTaskLoss([TaskLossSpec("clean"), TaskLossSpec("noisy")], weighting=weighting)
    optimizer = torch.optim.Adam([*net.parameters(), *loss_fn.parameters()], lr=0.02)
    x, labels, w = _tiny_problem()
    for _ in range(steps):
        optimizer.zero_grad()
        total, per_task = loss_fn(net(x), labels, w, shared=list(net.shared.parameters()))
        total.backward()
        optimizer.step()
    return loss_fn, per_task


def test_uncertainty_one_step_by_hand():
    torch.manual_seed(0)
    net = _Tiny()
    loss_fn = MultiTaskLoss([TaskLossSpec("clean"), TaskLossSpec("noisy")], weighting="uncertainty")
    with torch.no_grad():
        loss_fn.log_vars.copy_(torch.tensor([0.3, -0.2]))
    x, labels, w = _tiny_problem(16)
    total, per_task = loss_fn(net(x), labels, w)
    total.backward()
    s, L = torch.tensor([0.3, -0.2]), torch.stack([per_task["clean"], per_task["noisy"]])
    torch.testing.assert_close(total.detach(), (torch.exp(-s) * L + s).sum())
    torch.testing.assert_close(loss_fn.log_vars.grad, 1 - torch.exp(-s) * L)  # d/ds (e^-s L + s)
    # The network sees each task's gradient scaled by exp(-s_k).
    reference = _Tiny()
    reference.load_state_dict(net.state_dict())
    logits = reference(x)
    sum(torch.exp(-s[k]) * _bce(logits[t], labels[t]) for k, t in enumerate(("clean", "noisy"))).backward()
    torch.testing.assert_close(net.shared.weight.grad, reference.shared.weight.grad)
    assert loss_fn.task_weights() == pytest.approx(
        {"clean": float(torch.exp(-s[0])), "noisy": float(torch.exp(-s[1]))}
    )


def test_uncertainty_gives_the_noisier_task_the_smaller_weight():
    loss_fn, per_task = _train("uncertainty")
    weights = loss_fn.task_weights()
    assert weights["noisy"] < weights["clean"] / 10
    # The optimum of exp(-s) L + s is exp(s) = L: the noisy task's weight is about 1 / its loss.
    assert weights["noisy"] == pytest.approx(1 / float(per_task["noisy"]), rel=0.05)


def test_gradnorm_one_step_by_hand():
    torch.manual_seed(0)
    net = _Tiny()
    loss_fn = MultiTaskLoss(
        [TaskLossSpec("clean"), TaskLossSpec("noisy")], weighting="gradnorm", gradnorm_alpha=1.5
    )
    x, labels, w = _tiny_problem(16)
    W = list(net.shared.parameters())

    # Step 0: L(0) is recorded, every r_k is 1, so the target is the mean gradient norm.
    total, per_task = loss_fn(net(x), labels, w, shared=W)
    L0 = torch.stack([per_task["clean"], per_task["noisy"]])
    torch.testing.assert_close(loss_fn.initial_losses, L0)

    # A later step with other weights and a moved network: check every term against a hand computation.
    with torch.no_grad():
        loss_fn.gradnorm_weights.copy_(torch.tensor([3.0, 1.0]))  # renormalised to [1.5, 0.5]
        net.heads["clean"].weight.mul_(3.0)
    net.zero_grad()
    total, per_task = loss_fn(net(x), labels, w, shared=W)
    total.backward()
    torch.testing.assert_close(loss_fn.gradnorm_weights.detach(), torch.tensor([1.5, 0.5]))

    reference = _Tiny()
    reference.load_state_dict(net.state_dict())
    logits = reference(x)
    losses = [_bce(logits[t], labels[t]) for t in ("clean", "noisy")]
    rW = list(reference.shared.parameters())
    norms = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(L, rW, retain_graph=True)]).norm()
            for L in losses
        ]
    )
    weights = torch.tensor([1.5, 0.5])
    G = weights * norms
    ratio = torch.stack(losses).detach() / L0
    target = G.mean() * (ratio / ratio.mean()) ** 1.5
    torch.testing.assert_close(
        total.detach(), (weights * torch.stack(losses)).sum().detach() + (G - target).abs().sum()
    )
    # w's gradient: d/dw_k Σ_j |w_j g_j − target_j| = sign(G_k − target_k) · g_k (target held fixed).
    torch.testing.assert_close(loss_fn.gradnorm_weights.grad, torch.sign(G - target) * norms)
    # The network's gradient is that of Σ w_k L_k only: nothing of the GradNorm loss reaches it.
    (weights * torch.stack(losses)).sum().backward()
    for mine, theirs in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine.grad, theirs.grad)
    assert loss_fn.task_weights() == pytest.approx({"clean": 1.5, "noisy": 0.5})

    # Eval mode (and no_grad): Σ w_k L_k with the normalised weights, nothing recorded or moved.
    loss_fn.eval()
    with torch.no_grad():
        evaluated, _ = loss_fn(net(x), labels, w)
    torch.testing.assert_close(evaluated, (weights * torch.stack(losses)).sum().detach())


def test_gradnorm_gives_the_slower_task_the_larger_weight():
    loss_fn, per_task = _train("gradnorm")
    weights = loss_fn.task_weights()
    ratios = {t: float(per_task[t] / loss_fn.initial_losses[k]) for k, t in enumerate(("clean", "noisy"))}
    assert ratios["noisy"] > 2 * ratios["clean"]  # noisy's loss falls more slowly...
    assert weights["noisy"] > 1.5 > weights["clean"]  # ...so it gets the larger weight
    assert sum(weights.values()) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "model",
    [
        {"type": "ple", "num_levels": 2},
        {"type": "cgc"},
        {"type": "mmoe", "num_experts": 2},
        {"type": "shared_bottom", "bottom_hidden": [8]},
        {"type": "dtn", "methods": ["gdcn", "masknet"], "module_width": 8},
    ],
)
def test_every_multi_task_network_exposes_its_shared_layer_to_gradnorm(model):
    from pydantic import TypeAdapter
    from towerrec.modules.builders import build_network
    from towerrec.modules.config import ModelConfig

    tasks = ["click", "cvr"]
    network = build_network(TypeAdapter(ModelConfig).validate_python(model), 6, tasks)
    shared = network.last_shared_parameters()
    owned = {id(p) for p in network.parameters()}
    assert shared and all(id(p) in owned for p in shared)
    loss_fn = MultiTaskLoss([TaskLossSpec(t) for t in tasks], weighting="gradnorm")
    logits = network(torch.randn(B, 6))
    labels = {t: torch.tensor([1, 0, 1, 0, 1, 1, 0, 0.0]) for t in tasks}
    total, _ = loss_fn(logits, labels, torch.ones(B), shared=shared)
    total.backward()
    assert loss_fn.gradnorm_weights.grad.abs().sum() > 0
    assert all(p.grad is not None for p in shared)


def test_single_task_has_no_shared_layer():
    from towerrec.modules.builders import build_network
    from towerrec.modules.config import SingleTaskConfig

    network = build_network(SingleTaskConfig(type="single_task"), 6, ["click"])
    assert not hasattr(network, "last_shared_parameters")
